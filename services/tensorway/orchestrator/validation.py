"""The checks a request must pass against its model's signature before Triton sees it.

Every problem found is reported at once, as a BadRequest field violation whose field is the
request path (`inputs[1].shape`) and whose description names the tensor.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import NoReturn

from tritonclient.grpc import service_pb2 as triton

from tensorway.common.v1 import error_pb2, tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.runtime import FieldViolation, InvalidArgument, NotFound
from tensorway.tensors.layouts import BYTES, CONTENTS_FIELDS, FIXED_SIZE_DTYPES
from tensorway.tensors.signatures import ModelSignature, TensorSpec

# Triton's raw BYTES elements each start with a 4-byte little-endian length.
_BYTES_PREFIX = struct.Struct("<I")
# Walking the length prefixes is a Python loop over the elements, about 0.15 µs each: up to this
# many it is checked here, which spares Triton the request and the client Triton's wording; past
# it Triton checks them and its messages are put in the mesh's words (triton_errors).
MAX_WALKED_BYTES_ELEMENTS = 16384
_SHARED_MEMORY_REGION = "shared_memory_region"
_SHARED_MEMORY_BYTE_SIZE = "shared_memory_byte_size"
_SHARED_MEMORY_OFFSET = "shared_memory_offset"
NO_SHARED_MEMORY = (
    "shared memory is not available through tensorway: the router and the Tritons behind it run in "
    "other processes, usually on other machines, so they cannot map a region of the client's "
    "memory; send tensors in the request (raw_input_contents) instead"
)


# Tensorway's request and Triton's have the same shape where validation looks.
Request = pb.InferRequest | triton.ModelInferRequest
InputTensor = tensor_pb2.Tensor | triton.ModelInferRequest.InferInputTensor


def validate_request(request: Request, signature: ModelSignature, raw: Sequence[bytes]) -> None:
    """Raise InvalidArgument (TENSOR_INVALID) listing every way `request` misfits `signature`;
    `raw` is each input's raw bytes (`raw_inputs` of either kind of request)."""
    inputs: Sequence[InputTensor] = request.inputs
    outputs: Sequence[pb.RequestedOutput | triton.ModelInferRequest.InferRequestedOutputTensor] = (
        request.outputs
    )
    violations: list[FieldViolation] = []
    seen: set[str] = set()
    batch_sizes: dict[str, int] = {}
    for index, (tensor, tensor_raw) in enumerate(zip(inputs, raw, strict=True)):
        field = f"inputs[{index}]"
        expected = signature.inputs_by_name.get(tensor.name)
        if expected is None:
            known = ", ".join(signature.inputs_by_name)
            violations.append(
                FieldViolation(
                    f"{field}.name", f"{signature.name} has no input {tensor.name!r}; it has {known}"
                )
            )
            continue
        if tensor.name in seen:
            violations.append(FieldViolation(f"{field}.name", f"input {tensor.name!r} is given twice"))
            continue
        seen.add(tensor.name)
        tensor_violations = _check_tensor(field, tensor, tensor_raw, expected, signature)
        violations += tensor_violations
        if not tensor_violations and signature.max_batch_size > 0:
            batch_sizes[tensor.name] = tensor.shape[0]
    for expected in signature.inputs:
        if expected.name not in seen and not expected.optional:
            violations.append(FieldViolation("inputs", f"input {expected.name!r} is missing"))
    if len(set(batch_sizes.values())) > 1:
        sizes = ", ".join(f"{name}: {size}" for name, size in batch_sizes.items())
        violations.append(FieldViolation("inputs", f"inputs disagree on the batch size ({sizes})"))
    for index, output in enumerate(outputs):
        if output.name not in signature.outputs_by_name:
            known = ", ".join(signature.outputs_by_name)
            violations.append(
                FieldViolation(
                    f"outputs[{index}].name",
                    f"{signature.name} has no output {output.name!r}; it has {known}",
                )
            )
    if violations:
        problems = "; ".join(violation.description for violation in violations)
        raise InvalidArgument(
            f"request does not fit model {signature.name!r}: {problems}",
            violations,
            reason=error_pb2.ERROR_REASON_TENSOR_INVALID,
            metadata={"model": signature.name},
        )


def _check_tensor(
    field: str, tensor: InputTensor, raw: bytes, expected: TensorSpec, signature: ModelSignature
) -> list[FieldViolation]:
    name = tensor.name
    if tensor.datatype != expected.datatype:
        return [
            FieldViolation(
                f"{field}.datatype",
                f"input {name!r} must be {expected.datatype}, not {tensor.datatype or 'unset'}",
            )
        ]
    shape_problem = _shape_problem(tensor.shape, expected, signature)
    if shape_problem:
        return [FieldViolation(f"{field}.shape", f"input {name!r}: {shape_problem}")]
    problem = _contents_problem(tensor, raw, math.prod(tensor.shape))
    return [FieldViolation(f"{field}.{problem[0]}", f"input {name!r}: {problem[1]}")] if problem else []


def _shape_problem(shape: Sequence[int], expected: TensorSpec, signature: ModelSignature) -> str | None:
    wanted = signature.expected_shape(expected)
    described = f"shape {list(shape)} does not match {wanted}"
    if len(shape) != len(wanted) or any(dim < 0 for dim in shape):
        return described
    if signature.max_batch_size > 0 and not 1 <= shape[0] <= signature.max_batch_size:
        return f"batch size {shape[0]} is outside 1..{signature.max_batch_size}"
    if any(want not in (-1, dim) for dim, want in zip(shape, wanted, strict=True)):
        return described
    return None


def _contents_problem(tensor: InputTensor, raw: bytes, count: int) -> tuple[str, str] | None:
    """The (field suffix, description) of what is wrong with the tensor's data, if anything."""
    typed_fields = tensor.contents.ListFields()
    if raw and typed_fields:
        return "contents", "set contents or raw_contents, not both"
    if raw:
        size = len(raw)
        if tensor.datatype == BYTES:
            problem = _bytes_layout_problem(raw, count)
            return ("raw_contents", problem) if problem else None
        expected_size = count * FIXED_SIZE_DTYPES[tensor.datatype].itemsize
        if size != expected_size:
            return (
                "raw_contents",
                f"{size} bytes, but {count} {tensor.datatype} elements take {expected_size}",
            )
        return None
    wanted_field = CONTENTS_FIELDS[tensor.datatype]
    present = {descriptor.name: len(values) for descriptor, values in typed_fields}
    if set(present) - {wanted_field}:
        return "contents", f"{tensor.datatype} goes in contents.{wanted_field}, not {', '.join(present)}"
    given = present.get(wanted_field, 0)
    if given != count:
        return "contents", f"{given} values in contents.{wanted_field}, but the shape holds {count}"
    return None


def _bytes_layout_problem(raw: bytes, count: int) -> str | None:
    """What is wrong with the layout of `count` raw BYTES elements (each a length prefix, then
    that many bytes, filling the buffer exactly), if anything."""
    size = len(raw)
    if size < count * _BYTES_PREFIX.size:
        return f"{size} bytes cannot hold {count} BYTES elements"
    if count > MAX_WALKED_BYTES_ELEMENTS:
        return None
    unpack = _BYTES_PREFIX.unpack_from
    offset = 0
    for index in range(count):
        if offset + _BYTES_PREFIX.size > size:
            return f"holds {index} BYTES elements, but its shape holds {count}"
        (length,) = unpack(raw, offset)
        offset += _BYTES_PREFIX.size + length
        if offset > size:
            return f"BYTES element {index}'s length prefix says {length} bytes, past the end of the tensor"
    if offset != size:
        return f"{size - offset} bytes follow the last of its {count} BYTES elements"
    return None


def check_triton_contents(request: triton.ModelInferRequest) -> None:
    """Refuse, with Triton's codes, what Triton refuses of a ModelInferRequest's contents and the
    mesh cannot carry: typed contents beside raw ones (INVALID_ARGUMENT), and tensors in shared
    memory (malformed parameters are INVALID_ARGUMENT; well-formed ones NOT_FOUND, as Triton says
    of a region it does not know: no region is ever registered through the mesh).
    `validate_request` checks the rest; raw buffers past the inputs are ignored, as Triton does."""
    for index, tensor in enumerate(request.inputs):
        _check_shared_memory("inputs", index, tensor)
    for index, output in enumerate(request.outputs):
        _check_shared_memory("outputs", index, output)
    raw = request.raw_input_contents
    if not raw:
        return
    for index, tensor in enumerate(request.inputs):
        if tensor.contents.ListFields():
            raise InvalidArgument(
                f"input {tensor.name!r} has contents, but the request has raw_input_contents: "
                "send every input in one or the other",
                [FieldViolation(f"inputs[{index}].contents", "set contents or raw_input_contents, not both")],
                reason=error_pb2.ERROR_REASON_TENSOR_INVALID,
            )


def _check_shared_memory(
    field: str,
    index: int,
    tensor: triton.ModelInferRequest.InferInputTensor | triton.ModelInferRequest.InferRequestedOutputTensor,
) -> None:
    """Triton's checks of a tensor's shared-memory parameters, in Triton's order."""
    parameters = tensor.parameters
    where = f"{field}[{index}].parameters"

    def kind(name: str) -> str | None:
        parameter = parameters.get(name)
        return None if parameter is None else str(parameter.WhichOneof("parameter_choice"))

    def refuse(why: str) -> NoReturn:
        raise InvalidArgument(
            f"{field[:-1]} {tensor.name!r}: {why}",
            [FieldViolation(where, why)],
            reason=error_pb2.ERROR_REASON_TENSOR_INVALID,
        )

    region = parameters.get(_SHARED_MEMORY_REGION)
    if region is None:
        if _SHARED_MEMORY_BYTE_SIZE in parameters or _SHARED_MEMORY_OFFSET in parameters:
            refuse(f"{_SHARED_MEMORY_BYTE_SIZE} and {_SHARED_MEMORY_OFFSET} need {_SHARED_MEMORY_REGION}")
        return
    if kind(_SHARED_MEMORY_REGION) != "string_param":
        refuse(f"{_SHARED_MEMORY_REGION} must be a string_param")
    if kind(_SHARED_MEMORY_BYTE_SIZE) != "int64_param":
        refuse(f"{_SHARED_MEMORY_REGION} needs {_SHARED_MEMORY_BYTE_SIZE} as an int64_param")
    if kind(_SHARED_MEMORY_OFFSET) not in (None, "int64_param"):
        refuse(f"{_SHARED_MEMORY_OFFSET} must be an int64_param")
    raise NotFound(
        "shared memory region",
        region.string_param,
        f"{field[:-1]} {tensor.name!r} is in shared memory region {region.string_param!r}, which is "
        f"not registered: {NO_SHARED_MEMORY}",
    )
