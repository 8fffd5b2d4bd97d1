"""The KServe V2 HTTP/REST inference body (what `tritonclient.http`, KServe and MLServer send) as
Triton's gRPC inference messages, and Triton's answers as that body, in one place.

The router serves the HTTP protocol by turning a request into the `ModelInferRequest` its Triton
gRPC API takes, so both doors route, validate and convert alike from there on. A body is a JSON
header, optionally followed by the binary tensor extension's buffers: `Inference-Header-Content-
Length` says where the JSON ends, each binary input says its size in `binary_data_size`, and the
buffers follow in input order. JSON tensors are packed into the same raw layout with the helpers of
`layouts` (Triton takes all inputs raw once any is), so a request reaches Triton the same way
whichever encoding the client chose; outputs come back binary or as JSON values as the client asks
(`binary_data` on an output, else `binary_data_output` on the request).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from tritonclient.grpc import service_pb2 as triton

from tensorway.common.v1 import tensor_pb2
from tensorway.runtime import FieldViolation, InvalidArgument
from tensorway.tensors.layouts import BYTES, CONTENTS_FIELDS, pack_contents, unpack_contents

HEADER_LENGTH = "Inference-Header-Content-Length"
"""The response and request header that says how long the JSON part of a binary body is."""
BINARY_DATA_SIZE = "binary_data_size"
# Parameters that only say how the HTTP body is laid out: they never reach the model.
_REQUEST_LAYOUT = "binary_data_output"
_OUTPUT_LAYOUT = "binary_data"
_INT64_RANGE = (-(2**63), 2**63 - 1)


@dataclass(frozen=True, slots=True)
class InferCall:
    """An HTTP inference request as Triton's gRPC request, and how its answer is to be laid out."""

    request: Any
    """The Triton ModelInferRequest."""
    binary_outputs: frozenset[str]
    """Outputs the request asks for as binary buffers (`binary_data: true`)."""
    json_outputs: frozenset[str]
    """Outputs the request asks for as JSON values (`binary_data: false`)."""
    binary_by_default: bool
    """Whether the other outputs (all of them, when the request names none) are binary."""

    def binary(self, output: str) -> bool:
        """Whether the answer carries `output` as a binary buffer."""
        return output in self.binary_outputs or (self.binary_by_default and output not in self.json_outputs)


def _invalid(message: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, [FieldViolation(field, message)])


def _set_parameter(target: Any, key: str, value: Any, field: str) -> None:
    """A JSON parameter value into a Triton InferParameter."""
    if isinstance(value, bool):
        target[key].bool_param = value
    elif isinstance(value, int):
        if not _INT64_RANGE[0] <= value <= _INT64_RANGE[1]:
            raise _invalid(f"parameter {key!r} is out of the int64 range", f"{field}.{key}")
        target[key].int64_param = value
    elif isinstance(value, float):
        target[key].double_param = value
    elif isinstance(value, str):
        target[key].string_param = value
    else:
        raise _invalid(f"parameter {key!r} must be a boolean, number or string", f"{field}.{key}")


def _parameters(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid("'parameters' must be a JSON object", field)
    return value


def _string(value: Any, field: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _invalid(f"{field!r} must be a string", field)
    return value


def _shape(value: Any, field: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise _invalid(f"{field!r} must be a list of integers", field)
    if any(not _INT64_RANGE[0] <= d <= _INT64_RANGE[1] for d in value):
        raise _invalid(f"{field!r} has a dimension out of the int64 range", field)
    return value


def _flattened(data: Any) -> list[Any]:
    """JSON tensor data, nested in row-major order or flat, as one flat list."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    for item in data:
        flat.extend(_flattened(item))
    return flat


def _json_contents(datatype: str, data: Any, field: str) -> bytes:
    """JSON values of `datatype` in Triton's raw layout, through typed contents so that each value
    is checked against the datatype's field (a string where numbers go, a fraction in an integer,
    an integer out of range are refused) and packed as the gRPC API packs typed contents."""
    contents_field = CONTENTS_FIELDS.get(datatype)
    if contents_field is None:
        raise _invalid(f"unknown datatype {datatype!r}", f"{field}.datatype")
    values = _flattened(data)
    if datatype == BYTES:
        if not all(isinstance(value, str) for value in values):
            raise _invalid("BYTES data must be strings", f"{field}.data")
        values = [value.encode() for value in values]
    elif datatype == "BOOL":
        if not all(isinstance(value, bool) for value in values):
            raise _invalid("BOOL data must be true or false", f"{field}.data")
    elif any(isinstance(value, bool) for value in values):
        raise _invalid(f"{datatype} data must be numbers", f"{field}.data")
    contents = tensor_pb2.TensorContents()
    try:
        getattr(contents, contents_field).extend(values)
    except (TypeError, ValueError) as error:
        raise _invalid(f"{datatype} data does not fit the datatype ({error})", f"{field}.data") from None
    return pack_contents(datatype, contents)


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header of a body and the binary buffers after it."""
    if header_length is None:
        json_part, buffers = body, memoryview(b"")
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise _invalid(f"{HEADER_LENGTH} must be an integer", HEADER_LENGTH) from None
        if not 0 <= length <= len(body):
            raise _invalid(f"{HEADER_LENGTH} {length} is past the body's {len(body)} bytes", HEADER_LENGTH)
        json_part, buffers = body[:length], memoryview(body)[length:]
    try:
        header = orjson.loads(json_part)
    except orjson.JSONDecodeError as error:
        raise _invalid(f"the request body is not JSON: {error}", "body") from None
    if not isinstance(header, dict):
        raise _invalid("the request body must be a JSON object", "body")
    return header, buffers


def _add_inputs(request: Any, inputs: Any, buffers: memoryview) -> None:
    """The inputs of a JSON header into `request`, every one raw: binary ones cut from `buffers`
    in order, JSON ones packed."""
    if not isinstance(inputs, list):
        raise _invalid("'inputs' must be a list", "inputs")
    offset = 0
    for index, tensor in enumerate(inputs):
        field = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            raise _invalid(f"{field} must be a JSON object", field)
        datatype = _string(tensor.get("datatype"), f"{field}.datatype")
        entry = request.inputs.add(
            name=_string(tensor.get("name"), f"{field}.name"),
            datatype=datatype,
            shape=_shape(tensor.get("shape"), f"{field}.shape"),
        )
        size = None
        for key, value in _parameters(tensor.get("parameters"), f"{field}.parameters").items():
            if key != BINARY_DATA_SIZE:
                _set_parameter(entry.parameters, key, value, f"{field}.parameters")
            elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                size = value
            else:
                raise _invalid(f"{BINARY_DATA_SIZE} must be a size in bytes", f"{field}.parameters")
        if size is None:
            if "data" not in tensor:
                raise _invalid(f"input {entry.name!r} has neither 'data' nor binary data", f"{field}.data")
            request.raw_input_contents.append(_json_contents(datatype, tensor["data"], field))
            continue
        if "data" in tensor:
            raise _invalid("an input has either 'data' or binary data, not both", f"{field}.data")
        if offset + size > len(buffers):
            left = len(buffers) - offset
            raise _invalid(
                f"input {entry.name!r} needs {size} bytes of binary data, {left} are left",
                f"{field}.parameters",
            )
        request.raw_input_contents.append(bytes(buffers[offset : offset + size]))
        offset += size
    if offset != len(buffers):
        raise _invalid(f"{len(buffers) - offset} bytes of binary data follow the inputs' own", "body")


def parse_infer_request(model: str, version: str, body: bytes, header_length: str | None) -> InferCall:
    """The Triton ModelInferRequest for an HTTP inference body (`header_length`: the value of its
    Inference-Header-Content-Length header); INVALID_ARGUMENT naming the field for a body that is
    not one."""
    header, buffers = _split(body, header_length)
    request = triton.ModelInferRequest(
        model_name=model, model_version=version, id=_string(header.get("id"), "id", required=False)
    )
    parameters = _parameters(header.get("parameters"), "parameters")
    for key, value in parameters.items():
        if key != _REQUEST_LAYOUT:
            _set_parameter(request.parameters, key, value, "parameters")
    _add_inputs(request, header.get("inputs"), buffers)
    binary_outputs: list[str] = []
    json_outputs: list[str] = []
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise _invalid("'outputs' must be a list", "outputs")
    for index, output in enumerate(outputs):
        field = f"outputs[{index}]"
        if not isinstance(output, dict):
            raise _invalid(f"{field} must be a JSON object", field)
        wanted = request.outputs.add(name=_string(output.get("name"), f"{field}.name"))
        for key, value in _parameters(output.get("parameters"), f"{field}.parameters").items():
            if key == _OUTPUT_LAYOUT:
                (binary_outputs if value is True else json_outputs).append(wanted.name)
            else:
                _set_parameter(wanted.parameters, key, value, f"{field}.parameters")
    return InferCall(
        request, frozenset(binary_outputs), frozenset(json_outputs), parameters.get(_REQUEST_LAYOUT) is True
    )


def _json_value(parameter: Any) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _json_data(datatype: str, raw: bytes) -> list[Any]:
    contents = tensor_pb2.TensorContents()
    unpack_contents(datatype, raw, contents)
    values = list(getattr(contents, CONTENTS_FIELDS[datatype]))
    if datatype == BYTES:
        # JSON carries text; a client wanting arbitrary bytes asks for binary data.
        return [value.decode(errors="replace") for value in values]
    if datatype in ("FP16", "FP32", "BF16", "FP64") and not all(map(math.isfinite, values)):
        # JSON has no NaN or infinity; orjson would write null, which no client could read back.
        raise _invalid(f"a {datatype} output holds values JSON cannot carry: ask for binary data", "outputs")
    return values


def infer_response_body(call: InferCall, response: Any) -> tuple[bytes, int | None]:
    """The HTTP body for Triton's answer to `call`, and the length of its JSON part when binary
    buffers follow it (None: the body is all JSON)."""
    outputs: list[dict[str, Any]] = []
    buffers: list[bytes] = []
    raw_outputs: Sequence[bytes] = response.raw_output_contents
    for index, output in enumerate(response.outputs):
        raw = raw_outputs[index] if index < len(raw_outputs) else b""
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        parameters = {key: _json_value(value) for key, value in output.parameters.items()}
        if call.binary(output.name):
            parameters[BINARY_DATA_SIZE] = len(raw)
            buffers.append(raw)
        else:
            entry["data"] = _json_data(output.datatype, raw)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        body["id"] = response.id
    if response.parameters:
        body["parameters"] = {key: _json_value(value) for key, value in response.parameters.items()}
    body["outputs"] = outputs
    header = orjson.dumps(body)
    if not buffers:
        return header, None
    return b"".join([header, *buffers]), len(header)
