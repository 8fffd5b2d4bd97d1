"""NumPy arrays to and from `tensorway.common.v1.Tensor`, raw little-endian bytes both ways.

The byte layouts are the orchestrator's (Triton's); this module only adds the NumPy views a
batch worker needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from tensorway.common.v1 import tensor_pb2
from tensorway.tensors.layouts import BYTES, FIXED_SIZE_DTYPES, pack_bytes, pack_contents, unpack_bytes

# The NumPy kinds a JSON value may have to be taken as a datatype without losing meaning:
# integers become floats, but floats never silently truncate to integers.
ACCEPTED_KINDS: dict[str, str] = {"b": "b", "u": "bu", "i": "biu", "f": "biuf", "O": "OUS"}


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The NumPy dtype a V2 datatype's values are held in (objects for BYTES)."""
    return np.dtype(np.object_) if datatype == BYTES else FIXED_SIZE_DTYPES[datatype]


def to_tensor(name: str, datatype: str, array: npt.NDArray[Any]) -> tensor_pb2.Tensor:
    """A tensor carrying `array` as raw contents, which costs no per-element work."""
    if datatype == BYTES:
        raw = pack_bytes(array.reshape(-1))
    else:
        raw = np.ascontiguousarray(array, dtype=numpy_dtype(datatype)).tobytes()
    return tensor_pb2.Tensor(name=name, datatype=datatype, shape=array.shape, raw_contents=raw)


def from_tensor(tensor: tensor_pb2.Tensor) -> npt.NDArray[Any]:
    """The tensor's values as an array of its shape, from raw or typed contents."""
    raw = tensor.raw_contents or pack_contents(tensor.datatype, tensor.contents)
    if tensor.datatype == BYTES:
        return np.array(unpack_bytes(raw), dtype=np.object_).reshape(tuple(tensor.shape))
    return np.frombuffer(raw, dtype=numpy_dtype(tensor.datatype)).reshape(tuple(tensor.shape))


def _text(item: Any) -> Any:
    return item.decode("utf-8", "backslashreplace") if isinstance(item, bytes) else item


def json_rows(array: npt.NDArray[Any]) -> list[bytes]:
    """Each row of a batched output (an item of its first axis) as JSON text; bytes as UTF-8
    text where they are.

    Numbers go through orjson's numpy path in one call for the whole batch: per-row
    conversions cost more than inference. It prints each float with the fewest digits that
    read back as the same value of its own width (0.6369617, not float32's double widening
    0.6369616985321045), so JSON readers that narrow to FP32 get bit-exact model outputs from a
    third fewer bytes. NaN and infinities, which JSON cannot hold, become null.
    """
    if array.dtype == np.object_:
        return [orjson.dumps(row) for row in np.vectorize(_text, otypes=[np.object_])(array).tolist()]
    if len(array) == 0:
        return []
    text = orjson.dumps(np.ascontiguousarray(array), option=orjson.OPT_SERIALIZE_NUMPY)
    depth = array.ndim - 1
    if depth == 0:
        return text[1:-1].split(b",")
    # orjson writes no spaces and numbers hold no brackets, so rows `depth` deep are parted by
    # exactly `depth` closing brackets, a comma and `depth` opening ones, and nothing in a row is.
    opening, closing = b"[" * depth, b"]" * depth
    return [opening + row + closing for row in text[1 + depth : -1 - depth].split(closing + b"," + opening)]
