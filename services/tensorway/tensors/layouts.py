"""Tensor contents in the byte layouts Triton and tensorway's raw_contents share, and the typed
contents of the same values: which numpy type each V2 datatype is, and packing one into the other
with numpy, never element by element in Python (BYTES elements aside, which have no fixed size).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from tensorway.common.v1 import tensor_pb2

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
