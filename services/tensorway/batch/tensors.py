"""NumPy arrays to and from `tensorway.common.v1.Tensor`, raw little-endian bytes both ways."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from tensorway.common.v1 import tensor_pb2

NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
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
    "BYTES": np.dtype(np.object_),
}
# The NumPy kinds a JSON value may have to be taken as a datatype without losing meaning:
# integers become floats, but floats never silently truncate to integers.
ACCEPTED_KINDS: dict[str, str] = {"b": "b", "u": "bu", "i": "biu", "f": "biuf", "O": "OUS"}

CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "BF16": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The NumPy dtype of a V2 datatype; KeyError for one NumPy has no dtype for (BF16)."""
    return NUMPY_DTYPES[datatype]


def to_tensor(name: str, datatype: str, array: npt.NDArray[Any]) -> tensor_pb2.Tensor:
    """A tensor carrying `array` as raw contents, which costs no per-element work."""
    if datatype == "BYTES":
        raw = b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
    else:
        raw = np.ascontiguousarray(array, dtype=numpy_dtype(datatype)).tobytes()
    return tensor_pb2.Tensor(name=name, datatype=datatype, shape=array.shape, raw_contents=raw)


def _split_bytes(raw: bytes) -> list[bytes]:
    items = []
    offset = 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        items.append(raw[offset : offset + length])
        offset += length
    return items


def from_tensor(tensor: tensor_pb2.Tensor) -> npt.NDArray[Any]:
    """The tensor's values as an array of its shape, from raw or typed contents."""
    shape = tuple(tensor.shape)
    if tensor.datatype == "BYTES":
        items: list[bytes] = (
            _split_bytes(tensor.raw_contents) if tensor.raw_contents else list(tensor.contents.bytes_contents)
        )
        return np.array(items, dtype=np.object_).reshape(shape)
    dtype = numpy_dtype(tensor.datatype)
    if tensor.raw_contents:
        return np.frombuffer(tensor.raw_contents, dtype=dtype).reshape(shape)
    values = getattr(tensor.contents, CONTENTS_FIELDS[tensor.datatype])
    return np.asarray(values, dtype=dtype).reshape(shape)


def _text(item: Any) -> Any:
    return item.decode("utf-8", "backslashreplace") if isinstance(item, bytes) else item


def to_json_value(array: npt.NDArray[Any]) -> Any:
    """A JSON-ready value for one row's output: nested lists; bytes as UTF-8 text where they are."""
    if array.dtype == np.object_:
        return np.vectorize(_text, otypes=[np.object_])(array).tolist()
    # float32 values widen to the double that prints back to the same float32, so JSON
    # readers that narrow to FP32 get bit-exact model outputs.
    return array.tolist()
