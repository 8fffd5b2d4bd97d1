"""Conversion between tensorway's inference messages and Triton's, both ways, in one place.

The orchestrator turns tensorway requests into Triton's and Triton's answers into tensorway's;
Triton's own requests cross the mesh unconverted, as the bytes their clients sent (`from_triton_request`
is for tools and tests that speak both). Triton takes every input as raw bytes when any
input is raw, so requests to Triton always leave raw: raw tensors pass through untouched and typed
contents are packed with numpy. Triton's gRPC answers are always raw; outputs stay raw when the
caller asked for binary and are unpacked with numpy otherwise. Raw buffers move as bytes, each
referenced, never walked element by element.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.internal.containers import MessageMap
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as triton

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.runtime import FieldViolation, InvalidArgument
from tensorway.tensors.layouts import pack_contents, unpack_contents

INT64_MAX = 2**63 - 1


def config_datatype(data_type: model_config_pb2.DataType.ValueType) -> str:
    """The V2 name ("FP32") of a model config's DataType (TYPE_FP32); TYPE_STRING is BYTES."""
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def raw_inputs(request: pb.InferRequest) -> list[bytes]:
    """Each input's raw_contents (empty when typed). Every read of a protobuf bytes field copies
    it, so validation and conversion share this one read."""
    return [tensor.raw_contents for tensor in request.inputs]


def to_triton_request(request: pb.InferRequest, raw: Sequence[bytes]) -> Any:
    """The Triton ModelInferRequest for `request`, whose inputs validation has checked; `raw` is
    `raw_inputs(request)`."""
    converted = triton.ModelInferRequest(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    parameters_to_triton(request.parameters, converted.parameters)
    for tensor, tensor_raw in zip(request.inputs, raw, strict=True):
        entry = converted.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        parameters_to_triton(tensor.parameters, entry.parameters)
        converted.raw_input_contents.append(tensor_raw or pack_contents(tensor.datatype, tensor.contents))
    for output in request.outputs:
        wanted = converted.outputs.add(name=output.name)
        parameters_to_triton(output.parameters, wanted.parameters)
    return converted


def from_triton_response(response: Any, request: pb.InferRequest) -> pb.InferResponse:
    """The tensorway InferResponse for Triton's answer to `request`: the caller's id, and each
    output raw or typed as the caller asked."""
    binary = {output.name for output in request.outputs if output.binary}
    converted = pb.InferResponse(
        model_name=response.model_name, model_version=response.model_version, id=request.id
    )
    for key, value in response.parameters.items():
        converted.parameters[key].CopyFrom(parameter_from_triton(value))
    raw_outputs = response.raw_output_contents
    for index, output in enumerate(response.outputs):
        tensor = converted.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        # Triton omits the raw buffer of an empty trailing output.
        raw = raw_outputs[index] if index < len(raw_outputs) else b""
        if output.name in binary:
            tensor.raw_contents = raw
        else:
            unpack_contents(output.datatype, raw, tensor.contents)
    return converted


def from_triton_request(request: Any, default_outputs: Iterable[tensor_pb2.TensorSpec]) -> pb.InferRequest:
    """The tensorway InferRequest for a Triton ModelInferRequest.

    Outputs always come back raw, since Triton's gRPC clients read only raw output buffers; a
    request that names no outputs asks for all of them, `default_outputs` (the signature's).
    """
    converted = pb.InferRequest(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    for key, value in request.parameters.items():
        converted.parameters[key].CopyFrom(parameter_from_triton(value))
    raw_inputs = request.raw_input_contents
    for index, tensor in enumerate(request.inputs):
        entry = converted.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        for key, value in tensor.parameters.items():
            entry.parameters[key].CopyFrom(parameter_from_triton(value))
        if raw_inputs:
            entry.raw_contents = raw_inputs[index] if index < len(raw_inputs) else b""
        else:
            # Triton's InferTensorContents and tensorway's TensorContents share field numbers and
            # types, so the typed values cross as one serialized buffer instead of field by field.
            entry.contents.MergeFromString(tensor.contents.SerializeToString())
    for output in request.outputs:
        wanted = converted.outputs.add(name=output.name, binary=True)
        for key, value in output.parameters.items():
            wanted.parameters[key].CopyFrom(parameter_from_triton(value))
    if not request.outputs:
        converted.outputs.extend(pb.RequestedOutput(name=spec.name, binary=True) for spec in default_outputs)
    return converted


def parameters_to_triton(source: Mapping[str, tensor_pb2.Parameter], target: MessageMap[str, Any]) -> None:
    """Copy tensorway parameters into a Triton message's parameter map."""
    for key, parameter in source.items():
        kind = parameter.WhichOneof("value")
        if kind == "bool_value":
            target[key].bool_param = parameter.bool_value
        elif kind == "int64_value":
            target[key].int64_param = parameter.int64_value
        elif kind == "string_value":
            target[key].string_param = parameter.string_value
        elif kind == "double_value":
            target[key].double_param = parameter.double_value


def parameter_from_triton(parameter: Any) -> tensor_pb2.Parameter:
    """A Triton InferParameter as a tensorway Parameter (unsigned integers as int64);
    INVALID_ARGUMENT for an unsigned value int64 cannot hold."""
    kind = parameter.WhichOneof("parameter_choice")
    if kind == "uint64_param" and parameter.uint64_param > INT64_MAX:
        raise InvalidArgument(
            f"parameter value {parameter.uint64_param} is past the largest int64 tensorway carries",
            [FieldViolation("parameters", "uint64_param must be at most 2**63 - 1")],
        )
    if kind == "bool_param":
        return tensor_pb2.Parameter(bool_value=parameter.bool_param)
    if kind in ("int64_param", "uint64_param"):
        return tensor_pb2.Parameter(int64_value=getattr(parameter, kind))
    if kind == "double_param":
        return tensor_pb2.Parameter(double_value=parameter.double_param)
    return tensor_pb2.Parameter(string_value=parameter.string_param)


@dataclass(frozen=True, slots=True)
class SequenceStep:
    """Where a request stands in a stateful sequence (Triton's sequence batching): the sequence it
    belongs to, and whether it starts or ends it."""

    id: str
    """The sequence_id parameter as text (Triton takes an unsigned integer or a string)."""
    start: bool
    end: bool


def sequence_step(parameters: Mapping[str, tensor_pb2.Parameter]) -> SequenceStep | None:
    """The sequence a request's parameters put it in; None outside any (no id, or Triton's 0)."""
    parameter = parameters.get("sequence_id")
    if parameter is None:
        return None
    kind = parameter.WhichOneof("value")
    if kind == "int64_value" and parameter.int64_value != 0:
        sequence = str(parameter.int64_value)
    elif kind == "string_value" and parameter.string_value:
        sequence = parameter.string_value
    else:
        return None
    start, end = parameters.get("sequence_start"), parameters.get("sequence_end")
    return SequenceStep(
        sequence,
        start=start is not None and start.bool_value,
        end=end is not None and end.bool_value,
    )


def triton_sequence_step(parameters: Mapping[str, Any]) -> SequenceStep | None:
    """The sequence a Triton request's parameters (InferParameter) put it in; None outside any
    (no id, or Triton's 0)."""
    parameter = parameters.get("sequence_id")
    if parameter is None:
        return None
    kind = parameter.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param") and getattr(parameter, kind) != 0:
        sequence = str(getattr(parameter, kind))
    elif kind == "string_param" and parameter.string_param:
        sequence = parameter.string_param
    else:
        return None
    start, end = parameters.get("sequence_start"), parameters.get("sequence_end")
    return SequenceStep(
        sequence,
        start=start is not None and start.bool_param,
        end=end is not None and end.bool_param,
    )


def triton_raw_inputs(request: Any) -> list[bytes]:
    """Each input's raw contents of a Triton ModelInferRequest, in input order (empty for an input
    the request gives no raw buffer): Triton's inputs and raw buffers pair by position."""
    raw = list(request.raw_input_contents)
    count = len(request.inputs)
    return raw[:count] + [b""] * (count - len(raw))
