"""`tensorway infer MODEL --input NAME=VALUE ...`: one inference request through the context's Envoy
(or a router's internal address), with the outputs printed as a table, or as the InferResponse's
protobuf JSON (typed contents) for scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import grpc
import numpy as np
import numpy.typing as npt
import typer
from rich.console import Console
from rich.table import Table

from tensorway.cli.connection import connect
from tensorway.cli.errors import fail
from tensorway.cli.output import OutputFormat, OutputOption, emit, key_column, print_table
from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.tensors.layouts import BYTES, FIXED_SIZE_DTYPES, pack_bytes, unpack_bytes

ROUTE_KEY_HEADER = "x-tensorway-route-key"

Array = npt.NDArray[Any]


def parse_value(text: str) -> Any:
    """A JSON value, or the contents of a .npy or JSON file when `text` names one."""
    path = Path(text)
    if path.is_file():
        return np.load(path, allow_pickle=False) if path.suffix == ".npy" else json.loads(path.read_text())
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise typer.BadParameter(f"{text!r} is neither JSON nor a file") from error


def to_tensor(name: str, value: Any, spec: tensor_pb2.TensorSpec, batched: bool) -> tensor_pb2.Tensor:
    """`value` as the tensor `spec` declares, raw; a single unbatched example gains a batch of one."""
    if spec.datatype == BYTES:
        array: Array = np.asarray(value, dtype=np.object_)
        flat = [item if isinstance(item, bytes) else str(item).encode() for item in array.ravel()]
        raw = pack_bytes(flat)
    else:
        array = np.asarray(value, dtype=FIXED_SIZE_DTYPES[spec.datatype])
        raw = array.tobytes()
    shape = list(array.shape)
    if batched and len(shape) == len(spec.shape):
        shape = [1, *shape]
    return tensor_pb2.Tensor(name=name, datatype=spec.datatype, shape=shape, raw_contents=raw)


def from_tensor(tensor: tensor_pb2.Tensor) -> Array:
    if tensor.datatype == BYTES:
        items = [item.decode(errors="replace") for item in unpack_bytes(tensor.raw_contents)]
        return np.array(items, dtype=np.object_).reshape(tensor.shape)
    return np.frombuffer(tensor.raw_contents, dtype=FIXED_SIZE_DTYPES[tensor.datatype]).reshape(tensor.shape)


def infer_command(
    model: Annotated[str, typer.Argument(help="The model to run.")],
    *,
    inputs: Annotated[
        list[str],
        typer.Option(
            "--input", "-i", help="NAME=VALUE: VALUE is JSON (e.g. '[[1,2],[3,4]]') or a .json/.npy file."
        ),
    ],
    version: Annotated[str, typer.Option(help="A version or alias; empty lets the router choose.")] = "",
    router: Annotated[
        str,
        typer.Option(
            envvar="TENSORWAY_ROUTER_ADDRESS",
            help="Inside the network: a router's gRPC address, instead of the context's Envoy.",
        ),
    ] = "",
    route_key: Annotated[str | None, typer.Option(help="Pins you to one version of a split.")] = None,
    timeout: Annotated[float, typer.Option(help="Deadline in seconds.")] = 30.0,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Send one request to MODEL through the mesh and print its outputs."""
    console = Console()
    metadata = ((ROUTE_KEY_HEADER, route_key),) if route_key else ()
    connection = connect("router", router, option="--router", env_var="TENSORWAY_ROUTER_ADDRESS")
    # Raw outputs for the table; typed contents in JSON and YAML, where numbers read as numbers.
    binary = output is OutputFormat.TABLE
    with connection.channel() as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        try:
            signature = stub.GetModelMetadata(
                pb.GetModelMetadataRequest(model_name=model, model_version=version), timeout=timeout
            )
            specs = {spec.name: spec for spec in signature.inputs}
            request = pb.InferRequest(model_name=model, model_version=version)
            for item in inputs:
                name, separator, text = item.partition("=")
                if not separator or name not in specs:
                    raise typer.BadParameter(f"{item!r}: expected NAME=VALUE, NAME one of {sorted(specs)}")
                request.inputs.append(
                    to_tensor(name, parse_value(text), specs[name], signature.max_batch_size > 0)
                )
            request.outputs.extend(
                pb.RequestedOutput(name=spec.name, binary=binary) for spec in signature.outputs
            )
            response = stub.Infer(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise fail(error) from None

    def table() -> None:
        rows = Table(
            key_column("output"), "datatype", "shape", "values",
            title=f"{response.model_name} version {response.model_version}",
        )  # fmt: skip
        for tensor in response.outputs:
            values = np.array2string(from_tensor(tensor), threshold=50, max_line_width=100)
            rows.add_row(tensor.name, tensor.datatype, str(list(tensor.shape)), values)
        print_table(console, rows)

    emit(output, response, table)
