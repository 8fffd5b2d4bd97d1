"""Conversion between tensorway's inference messages and Triton's, in one place.

Triton takes every input as raw bytes when any input is raw, so requests always leave as raw
bytes: raw tensors pass through untouched and typed contents are packed with numpy. Triton's gRPC
answers are always raw; outputs stay raw when the caller asked for binary and are unpacked with
numpy otherwise.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf.internal.containers import MessageMap
from tritonclient.grpc import service_pb2 as triton

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.orchestrator.signatures import ModelSignature, TensorSignature

BYTES = "BYTES"
# Byte layout of each fixed-size V2 datatype. BF16 has no numpy type: it travels as its bit pattern.
FIXED_SIZE_DTYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
}
# Which TensorContents field carries each datatype's typed contents.
CONTENTS_FIELDS: Mapping[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "BF16": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}
# The element type of each TensorContents field, so its values convert without guessing.
_FIELD_DTYPES: Mapping[str, np.dtype[Any]] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype("<i4"),
    "int64_contents": np.dtype("<i8"),
    "uint_contents": np.dtype("<u4"),
    "uint64_contents": np.dtype("<u8"),
    "fp32_contents": np.dtype("<f4"),
    "fp64_contents": np.dtype("<f8"),
}
_LENGTH_PREFIX = struct.Struct("<I")


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
    _copy_parameters(request.parameters, converted.parameters)
    for tensor, tensor_raw in zip(request.inputs, raw, strict=True):
        entry = converted.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        _copy_parameters(tensor.parameters, entry.parameters)
        converted.raw_input_contents.append(tensor_raw or pack_contents(tensor.datatype, tensor.contents))
    for output in request.outputs:
        wanted = converted.outputs.add(name=output.name)
        _copy_parameters(output.parameters, wanted.parameters)
    return converted


def from_triton_response(response: Any, request: pb.InferRequest) -> pb.InferResponse:
    """The tensorway InferResponse for Triton's answer to `request`: the caller's id, and each
    output raw or typed as the caller asked."""
    binary = {output.name for output in request.outputs if output.binary}
    converted = pb.InferResponse(
        model_name=response.model_name, model_version=response.model_version, id=request.id
    )
    for key, value in response.parameters.items():
        converted.parameters[key].CopyFrom(_parameter_from_triton(value))
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


def pack_contents(datatype: str, contents: tensor_pb2.TensorContents) -> bytes:
    """Typed contents as Triton's raw bytes. Validation has checked the datatype and the field."""
    if datatype == BYTES:
        return pack_bytes(contents.bytes_contents)
    field = CONTENTS_FIELDS[datatype]
    values = np.asarray(getattr(contents, field), dtype=_FIELD_DTYPES[field])
    if datatype == "BF16":
        return _fp32_to_bf16_bits(values).tobytes()
    return values.astype(FIXED_SIZE_DTYPES[datatype]).tobytes()


def unpack_contents(datatype: str, raw: bytes, contents: tensor_pb2.TensorContents) -> None:
    """Fill typed `contents` from Triton's raw bytes."""
    if datatype == BYTES:
        contents.bytes_contents.extend(unpack_bytes(raw))
        return
    values: npt.NDArray[Any] = np.frombuffer(raw, dtype=FIXED_SIZE_DTYPES[datatype])
    if datatype == "BF16":
        values = (values.astype("<u4") << 16).view("<f4")
    getattr(contents, CONTENTS_FIELDS[datatype]).extend(values.tolist())


def pack_bytes(items: Iterable[bytes]) -> bytes:
    """BYTES elements in Triton's layout: each as a 4-byte little-endian length, then its bytes."""
    return b"".join(part for item in items for part in (_LENGTH_PREFIX.pack(len(item)), item))


def unpack_bytes(raw: bytes) -> list[bytes]:
    """The BYTES elements of a raw buffer in Triton's layout."""
    items = []
    view = memoryview(raw)
    offset = 0
    while offset < len(raw):
        (length,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += _LENGTH_PREFIX.size
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


def _fp32_to_bf16_bits(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    # Round to nearest even, as hardware BF16 conversion does, rather than truncating.
    bits = values.view("<u4")
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2")


def _copy_parameters(source: Mapping[str, tensor_pb2.Parameter], target: MessageMap[str, Any]) -> None:
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


def _parameter_from_triton(parameter: Any) -> tensor_pb2.Parameter:
    kind = parameter.WhichOneof("parameter_choice")
    if kind == "bool_param":
        return tensor_pb2.Parameter(bool_value=parameter.bool_param)
    if kind in ("int64_param", "uint64_param"):
        return tensor_pb2.Parameter(int64_value=getattr(parameter, kind))
    if kind == "double_param":
        return tensor_pb2.Parameter(double_value=parameter.double_param)
    return tensor_pb2.Parameter(string_value=parameter.string_param)


def metadata_response(signature: ModelSignature) -> pb.GetModelMetadataResponse:
    """GetModelMetadata's answer: shapes without the batch dimension, as TensorSpec says."""

    def specs(tensors: Iterable[TensorSignature]) -> list[tensor_pb2.TensorSpec]:
        return [tensor_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=t.dims) for t in tensors]

    return pb.GetModelMetadataResponse(
        name=signature.name,
        versions=signature.versions,
        platform=signature.platform,
        inputs=specs(signature.inputs.values()),
        outputs=specs(signature.outputs.values()),
        max_batch_size=signature.max_batch_size,
    )
