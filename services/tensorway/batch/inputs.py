"""Job inputs: dividing JSONL and .npy objects into shards, and decoding a shard's rows into
batched tensors that match the model's signature.

A JSONL row is a non-blank line; a shard is a byte range that starts at a row, so a worker
reads exactly its rows with one ranged GET. A .npy row is a slice of the first axis.
"""

from __future__ import annotations

import ast
import json
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from tensorway.batch.domain import InputPlan, NpyLayout, RowError, ShardPlan
from tensorway.batch.tensors import ACCEPTED_KINDS, numpy_dtype
from tensorway.tensors.layouts import BYTES
from tensorway.tensors.signatures import ModelSignature, TensorSpec

# Enough for any .npy header NumPy writes (it pads headers to 64 bytes; large shapes stay small).
NPY_HEADER_PROBE_BYTES = 64 * 1024
NPY_MAGIC = b"\x93NUMPY"

# Arrow's JSON parser recurses once per level of nesting and overflows the thread's stack (the
# worker dies of SIGSEGV) on a row nested 100,000 levels deep. A row of tensors needs
# a few levels; a shard nested deeper than this goes row by row, where orjson refuses the row.
COLUMNAR_MAX_DEPTH = 64
# Arrow parses a shard on the thread it is called on: a worker already parses its shards side by
# side, and Arrow's own threads only cost more CPU (a 10,000-row shard of digits: 39 ms of CPU
# with them, 33 ms without).
_ONE_THREAD = pa_json.ReadOptions(use_threads=False)


class InputError(Exception):
    """The input as a whole cannot be used for the job; the message says why."""


def plan_jsonl(chunks: Iterator[bytes], shard_size: int) -> InputPlan:
    """Count the rows of a JSONL stream and cut it into shards of `shard_size` rows."""
    starts: list[tuple[int, int]] = []  # (row, byte offset) where each shard begins
    rows = 0
    size = 0
    pending = b""
    pending_offset = 0
    for chunk in chunks:
        data = pending + chunk
        base = pending_offset
        size += len(chunk)
        line_start = 0
        while (newline := data.find(b"\n", line_start)) >= 0:
            if data[line_start:newline].strip():
                if rows % shard_size == 0:
                    starts.append((rows, base + line_start))
                rows += 1
            line_start = newline + 1
        pending = data[line_start:]
        pending_offset = base + line_start
    if pending.strip():
        if rows % shard_size == 0:
            starts.append((rows, pending_offset))
        rows += 1
    shards = tuple(
        ShardPlan(
            index=i,
            row_start=row,
            row_count=min(shard_size, rows - row),
            byte_start=offset,
            byte_end=starts[i + 1][1] if i + 1 < len(starts) else size,
        )
        for i, (row, offset) in enumerate(starts)
    )
    return InputPlan(shards=shards, rows_total=rows)


def plan_npy(head: bytes, object_size: int, shard_size: int) -> InputPlan:
    """Read a .npy header (the object's first bytes) and cut the array into shards."""
    shape, fortran_order, dtype, data_offset = _npy_header(head)
    if dtype.hasobject:
        raise InputError("holds Python objects; save a numeric array")
    if fortran_order:
        raise InputError("is in Fortran order; save it C-ordered (np.ascontiguousarray)")
    if len(shape) < 1:
        raise InputError("is a scalar; the first axis must index the rows")
    row_shape = tuple(int(d) for d in shape[1:])
    row_bytes = math.prod(row_shape) * dtype.itemsize
    rows = int(shape[0])
    if data_offset + rows * row_bytes != object_size:
        raise InputError(
            f"is {object_size} bytes but its header promises {data_offset + rows * row_bytes}: truncated?"
        )
    shards = tuple(
        ShardPlan(
            index=i,
            row_start=row,
            row_count=min(shard_size, rows - row),
            byte_start=data_offset + row * row_bytes,
            byte_end=data_offset + min(rows, row + shard_size) * row_bytes,
        )
        for i, row in enumerate(range(0, rows, shard_size))
    )
    return InputPlan(shards=shards, rows_total=rows, npy=NpyLayout(dtype.str, row_shape))


def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """(shape, fortran_order, dtype, data offset) from the first bytes of a .npy file."""
    if head[:6] != NPY_MAGIC or len(head) < 10:
        raise InputError("is not a NumPy .npy array (no .npy magic)")
    major = head[6]
    if major == 1:
        (length,) = struct.unpack_from("<H", head, 8)
        start = 10
    elif major in (2, 3):
        (length,) = struct.unpack_from("<I", head, 8)
        start = 12
    else:
        raise InputError(f"is a .npy file of unknown version {major}")
    text = head[start : start + length]
    if len(text) < length:
        raise InputError("has a .npy header larger than any NumPy writes")
    try:
        header = ast.literal_eval(text.decode("utf-8" if major == 3 else "latin1"))
        shape = tuple(int(d) for d in header["shape"])
        return shape, bool(header["fortran_order"]), np.dtype(header["descr"]), start + length
    except (ValueError, TypeError, KeyError, SyntaxError) as exc:
        raise InputError(f"has a .npy header that cannot be read: {exc}") from exc


@dataclass
class Batch:
    """Rows that go to the model in one request: their positions, ids and stacked inputs."""

    rows: list[int]
    ids: list[Any]
    inputs: dict[str, npt.NDArray[Any]]


def _shape_matches(shape: Sequence[int], spec: Sequence[int]) -> bool:
    return len(shape) == len(spec) and all(want in (-1, got) for got, want in zip(shape, spec, strict=True))


def _decode_value(value: Any, spec: TensorSpec) -> npt.NDArray[Any]:
    """One row's value for one input, as an array of the input's dtype and shape."""
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"input {spec.name!r}: {exc}") from exc
    if array.dtype.kind == "U":
        array = np.array([str(v).encode() for v in array.reshape(-1)], dtype=np.object_).reshape(array.shape)
    target = numpy_dtype(spec.datatype)
    if array.size and array.dtype.kind not in ACCEPTED_KINDS[target.kind]:
        raise ValueError(f"input {spec.name!r}: values of kind {array.dtype.name} are not {spec.datatype}")
    if not _shape_matches(array.shape, spec.shape):
        # A flat list is accepted for a fixed shape of the same size.
        if all(d >= 0 for d in spec.shape) and array.size == math.prod(spec.shape):
            array = array.reshape(spec.shape)
        else:
            raise ValueError(
                f"input {spec.name!r} has shape {list(array.shape)}; the model wants {list(spec.shape)}"
            )
    return array.astype(target)


def _json_row(line: bytes) -> Any:
    """One JSONL row: orjson, about twice as fast as the standard library's parser, which reads
    what orjson refuses (integers beyond 64 bits, NaN) and gives the error a row reports."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)


def decode_jsonl(
    data: bytes, row_start: int, signature: ModelSignature
) -> tuple[list[tuple[int, Any, dict[str, npt.NDArray[Any]]]], list[RowError]]:
    """A shard's JSONL bytes → (row, id, inputs) for each good row, and an error for each bad one.

    A row without an "id" is known by its position in the input.
    """
    wanted = {spec.name: spec for spec in signature.inputs}
    good: list[tuple[int, Any, dict[str, npt.NDArray[Any]]]] = []
    errors: list[RowError] = []
    row = row_start
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        row_id: Any = row
        try:
            item = _json_row(line)
            if not isinstance(item, dict) or not isinstance(item.get("inputs"), dict):
                raise ValueError('expected an object {"id": ..., "inputs": {"name": [...]}}')
            row_id = item.get("id", row)
            given = item["inputs"]
            missing = sorted(set(wanted) - set(given))
            unknown = sorted(set(given) - set(wanted))
            if missing or unknown:
                raise ValueError(
                    "; ".join(
                        [
                            *(f"missing input {n!r}" for n in missing),
                            *(f"unknown input {n!r}" for n in unknown),
                        ]
                    )
                )
            good.append(
                (row, row_id, {name: _decode_value(given[name], spec) for name, spec in wanted.items()})
            )
        except RecursionError:
            # Nested deeper than the parser recurses: this row's fault, not the shard's.
            errors.append(RowError(row=row, id=row_id, reason="nested too deeply to read"))
        except (ValueError, TypeError, OverflowError) as exc:
            reason = f"not valid JSON: {exc}" if isinstance(exc, json.JSONDecodeError) else str(exc)
            errors.append(RowError(row=row, id=row_id, reason=reason))
        row += 1
    return good, errors


def coalesce(rows: list[tuple[int, Any, dict[str, npt.NDArray[Any]]]], batch_size: int) -> list[Batch]:
    """Stack consecutive rows into batches of up to `batch_size` rows of equal shapes."""
    batches: list[Batch] = []
    pending: list[tuple[int, Any, dict[str, npt.NDArray[Any]]]] = []

    def flush() -> None:
        if pending:
            names = pending[0][2].keys()
            batches.append(
                Batch(
                    rows=[r for r, _, _ in pending],
                    ids=[i for _, i, _ in pending],
                    inputs={name: np.stack([inputs[name] for _, _, inputs in pending]) for name in names},
                )
            )
            pending.clear()

    def shapes(inputs: dict[str, npt.NDArray[Any]]) -> tuple[tuple[int, ...], ...]:
        return tuple(array.shape for array in inputs.values())

    for item in rows:
        if pending and (len(pending) >= batch_size or shapes(pending[0][2]) != shapes(item[2])):
            flush()
        pending.append(item)
    flush()
    return batches


def jsonl_batches(
    data: bytes, row_start: int, signature: ModelSignature, batch_size: int
) -> tuple[list[Batch], list[RowError]]:
    """A shard's JSONL bytes → batches of up to `batch_size` rows, and an error for each bad row.

    A shard whose rows are all well formed is read by Arrow's JSON parser straight into arrays,
    with no Python object per row or value (and without the GIL); any other is read row by row,
    which says which rows are at fault and why."""
    columns = _columnar_jsonl(data, row_start, signature)
    if columns is None:
        rows, errors = decode_jsonl(data, row_start, signature)
        return coalesce(rows, batch_size), errors
    ids, inputs = columns
    return [
        Batch(
            rows=list(range(row_start + start, row_start + min(start + batch_size, len(ids)))),
            ids=ids[start : start + batch_size],
            inputs={name: array[start : start + batch_size] for name, array in inputs.items()},
        )
        for start in range(0, len(ids), batch_size)
    ], []


def _columnar_jsonl(
    data: bytes, row_start: int, signature: ModelSignature
) -> tuple[list[Any], dict[str, npt.NDArray[Any]]] | None:
    """(ids, an array per input) of a shard whose every row `decode_jsonl` would take as it is,
    read column by column; None for a shard it might not, so that it decides."""
    wanted = {spec.name: spec for spec in signature.inputs}
    if any(spec.datatype == BYTES for spec in wanted.values()):
        return None
    if _nesting(data) > COLUMNAR_MAX_DEPTH:
        return None
    try:
        table = pa_json.read_json(pa.py_buffer(data), read_options=_ONE_THREAD)
    except (pa.ArrowException, ValueError):
        return None
    lines = sum(1 for line in data.split(b"\n") if line.strip())
    if table.num_rows == 0 or table.num_rows != lines or "inputs" not in table.column_names:
        return None
    given = table.column("inputs").combine_chunks()
    if (
        not pa.types.is_struct(given.type)
        or given.null_count
        or sorted(f.name for f in given.type) != sorted(wanted)
    ):
        return None
    # Ids of other kinds could read back differently (1.0 as a double would become 1.0 where the
    # row said 1; objects gain the keys of other rows' objects): those shards go row by row.
    if "id" in table.column_names:
        id_column = table.column("id")
        if id_column.null_count or not (
            pa.types.is_int64(id_column.type) or pa.types.is_string(id_column.type)
        ):
            return None
        ids: list[Any] = id_column.to_pylist()
    else:
        ids = list(range(row_start, row_start + table.num_rows))
    inputs: dict[str, npt.NDArray[Any]] = {}
    for name, spec in wanted.items():
        array = _column_values(given.field(name), spec)
        if array is None:
            return None
        inputs[name] = array
    return ids, inputs


def _nesting(data: bytes) -> int:
    """How deep the brackets of `data` nest, those inside strings included (a shard they push
    past the limit only goes row by row): about 6 ms for a 5 MB shard, a tenth of its parse."""
    octets = np.frombuffer(data, dtype=np.uint8)
    opens = (octets == ord("[")) | (octets == ord("{"))
    marks = np.flatnonzero(opens | (octets == ord("]")) | (octets == ord("}")))
    return int(np.cumsum(np.where(opens[marks], 1, -1), dtype=np.int32).max(initial=0))


def _column_values(column: pa.Array, spec: TensorSpec) -> npt.NDArray[Any] | None:
    """An input's column as one array of its dtype, [rows, *shape]; None unless every row holds
    numbers of a kind the input takes, in nested lists of one shape that fits it."""
    rows = len(column)
    dims: list[int] = []
    values = column
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        if values.null_count:
            return None
        lengths = pc.list_value_length(values).to_numpy()
        if len(lengths) and (lengths != lengths[0]).any():
            return None  # ragged: row by row, each row's shape is its own
        dims.append(int(lengths[0]) if len(lengths) else 0)
        values = values.flatten()
    kind = values.type
    if values.null_count or not (
        pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    ):
        return None
    flat: npt.NDArray[Any] = values.to_numpy(zero_copy_only=False)
    target = numpy_dtype(spec.datatype)
    if flat.dtype.kind not in ACCEPTED_KINDS[target.kind]:
        return None
    shape = tuple(dims)
    if not _shape_matches(shape, spec.shape):
        # A flat list is accepted for a fixed shape of the same size.
        if not (all(d >= 0 for d in spec.shape) and math.prod(shape) == math.prod(spec.shape)):
            return None
        shape = tuple(spec.shape)
    return flat.astype(target, copy=False).reshape(rows, *shape)


def npy_batches(
    data: bytes, row_start: int, layout: NpyLayout, signature: ModelSignature, batch_size: int
) -> list[Batch]:
    """A shard's .npy bytes → batches; row i of the array is known by its position."""
    if len(signature.inputs) != 1:
        raise InputError(
            f"is a .npy array, which feeds a model with one input; {signature.name!r} has "
            f"{len(signature.inputs)}: use JSONL"
        )
    (spec,) = signature.inputs
    if spec.datatype == "BYTES":
        raise InputError(f"is a numeric .npy array; input {spec.name!r} of {signature.name!r} takes BYTES")
    source = np.dtype(layout.dtype)
    target = numpy_dtype(spec.datatype)
    if source.kind not in ACCEPTED_KINDS[target.kind]:
        raise InputError(f"holds {source.name}, which input {spec.name!r} ({spec.datatype}) cannot take")
    if not _shape_matches(layout.row_shape, spec.shape):
        raise InputError(
            f"has rows of shape {list(layout.row_shape)}; input {spec.name!r} of {signature.name!r} "
            f"wants {list(spec.shape)}"
        )
    array = np.frombuffer(data, dtype=source).reshape(-1, *layout.row_shape).astype(target, copy=False)
    return [
        Batch(
            rows=list(range(row_start + start, row_start + start + len(chunk))),
            ids=list(range(row_start + start, row_start + start + len(chunk))),
            inputs={spec.name: chunk},
        )
        for start in range(0, len(array), batch_size)
        for chunk in [array[start : start + batch_size]]
    ]
