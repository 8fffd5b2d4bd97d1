"""Parquet inputs and outputs with pyarrow.

An input is one Parquet file or every `.parquet` file under a prefix, in key order; its rows are
numbered across the files. A shard is a row range of one file, cut at row-group boundaries where
the row groups are no larger than a shard, so a worker reads only the row groups of its shard,
through ranged GETs, a buffer at a time: memory follows the shard, never the file.

Each model input comes from a column: a scalar per row, or lists (fixed-size, or variable ones
whose rows all have the input's sizes) nested as deep as the input has dimensions; a flat list
also feeds a multi-dimensional input of the same size. A column that cannot feed its input (it is
missing, holds the wrong type or lists of the wrong size) fails the job, naming the file and the
column; a null in a row fails that row only.

An output part holds every row of its shard: the id column, a column per output tensor
(fixed-size lists, nested for more dimensions; binary for BYTES) and an `error` column, null
where the row was answered.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tensorway.batch.domain import InputPlan, ObjectRef, RowError, ShardPlan
from tensorway.batch.inputs import Batch, InputError
from tensorway.batch.object_store import ObjectStore, RangedObject, StorageError
from tensorway.batch.tensors import ACCEPTED_KINDS, numpy_dtype
from tensorway.tensors.signatures import ModelSignature, TensorSpec

PARQUET_SUFFIXES = (".parquet", ".parq")
# A prefix with more files than this is more likely a mistake than an input.
MAX_INPUT_FILES = 10_000
# Bytes a column's reader fetches at a time: one ranged GET each, and the most a column holds
# in memory beyond the rows being decoded, however large its row groups are.
READ_BUFFER_BYTES = 1 << 20
# A shard whose column chunks hold at most this many (compressed) bytes is fetched in one ranged
# GET; a larger one in READ_BUFFER_BYTES pieces, so a worker's memory never follows the size of
# an input's row groups.
PREFETCH_LIMIT_BYTES = 32 << 20
DEFAULT_ID_COLUMN = "id"
ERROR_COLUMN = "error"
BYTES_TYPES = (pa.binary(), pa.large_binary(), pa.string(), pa.large_string())


def _arrow_failure(exc: pa.ArrowException) -> BaseException:
    """What a pyarrow error while reading really was: a storage error raised by the file it
    read through comes back as its cause, anything else is the file's fault."""
    cause = exc.__cause__ or exc.__context__
    return cause if isinstance(cause, StorageError) else exc


def _open(
    file: RangedObject, uri: str, metadata: pq.FileMetaData | None = None, pre_buffer: bool = False
) -> pq.ParquetFile:
    """The file, its footer read unless `metadata` is given; with `pre_buffer` the column chunks
    a read needs are fetched together, in as few ranged GETs as their places allow."""
    try:
        return pq.ParquetFile(file, metadata=metadata, buffer_size=READ_BUFFER_BYTES, pre_buffer=pre_buffer)
    except pa.ArrowException as exc:
        failure = _arrow_failure(exc)
        if isinstance(failure, StorageError):
            raise failure from exc
        raise InputError(f"is not usable: {uri} is not a Parquet file ({exc})") from exc


# --- planning ---------------------------------------------------------------------------------


def cut_row_groups(groups: Sequence[int], shard_size: int) -> list[tuple[int, int]]:
    """(first row, rows) of each shard of a file whose row groups hold `groups` rows: whole row
    groups together up to `shard_size` rows, and a larger row group in pieces of `shard_size`."""
    shards: list[tuple[int, int]] = []
    start = 0  # the file's row where the shard being gathered begins
    gathered = 0
    for rows in groups:
        if gathered and gathered + rows > shard_size:
            shards.append((start, gathered))
            start, gathered = start + gathered, 0
        if rows > shard_size:
            # In equal pieces: 300 rows in shards of 250 are two of 150, not 250 and 50.
            step = math.ceil(rows / math.ceil(rows / shard_size))
            shards.extend((start + piece, min(step, rows - piece)) for piece in range(0, rows, step))
            start += rows
        else:
            gathered += rows
    if gathered:
        shards.append((start, gathered))
    return shards


def _row_groups(file: RangedObject, uri: str) -> list[int]:
    metadata = _open(file, uri).metadata
    return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


async def plan_parquet(objects: ObjectStore, ref: ObjectRef, shard_size: int) -> InputPlan:
    """Read the footers of the input's files and cut each file into shards."""
    if ref.key.endswith("/"):
        files = [
            (key, size) for key, size in await objects.list(ref) if key.lower().endswith(PARQUET_SUFFIXES)
        ]
        if not files:
            raise InputError("holds no .parquet files")
        if len(files) > MAX_INPUT_FILES:
            raise InputError(f"holds {len(files)} .parquet files; at most {MAX_INPUT_FILES} make one job")
    else:
        files = [(ref.key, await objects.size(ref))]
    shards: list[ShardPlan] = []
    rows_total = 0
    for key, size in files:
        source = ObjectRef(ref.bucket, key)
        groups = await objects.with_file(source, size, partial(_row_groups, uri=source.uri))
        for start, rows in cut_row_groups(groups, shard_size):
            shards.append(ShardPlan(len(shards), rows_total + start, rows, 0, size, key, start))
        rows_total += sum(groups)
    return InputPlan(shards=tuple(shards), rows_total=rows_total)


# --- reading a shard --------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnFeed:
    """How a column feeds a model input: its list sizes (None for variable lists) outermost
    first, and the dtype its values are read as."""

    spec: TensorSpec
    column: str
    list_sizes: tuple[int | None, ...]
    target: np.dtype[Any]

    def decode(self, array: pa.Array, uri: str, file_rows: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        """A batch of the column (no nulls in it) as an array of shape (rows, *input shape);
        `file_rows` are the rows' places in the file, for errors to name."""
        rows = len(array)
        level: pa.Array = array
        sizes: list[int] = []
        for depth, fixed in enumerate(self.list_sizes):
            if fixed is None:
                lengths = pc.list_value_length(level).to_numpy(zero_copy_only=False)
                want = self._wanted_size(depth)
                found = int(lengths[0]) if len(lengths) else (want or 0)
                wrong = np.flatnonzero(lengths != (want if want is not None else found))
                if len(wrong):
                    at = int(wrong[0])
                    raise InputError(
                        f"is not usable: {uri} column {self.column!r} has a list of {int(lengths[at])} "
                        f"values in row {int(file_rows[at])} of the file; input {self.spec.name!r} wants "
                        f"{want if want is not None else found} there (shape {list(self.spec.shape)})"
                    )
                sizes.append(found)
            else:
                sizes.append(fixed)
            level = level.flatten()
        if pa.types.is_string(level.type) or pa.types.is_large_string(level.type):
            values = np.array([v.encode() for v in level.to_pylist()], dtype=np.object_)
        elif self.target == np.object_:
            values = np.array(level.to_pylist(), dtype=np.object_)
        else:
            values = level.to_numpy(zero_copy_only=False)
        shape = tuple(self.spec.shape) if len(sizes) != len(self.spec.shape) else tuple(sizes)
        return values.reshape(rows, *shape).astype(self.target, copy=False)

    def _wanted_size(self, depth: int) -> int | None:
        if len(self.list_sizes) != len(self.spec.shape):  # a flat list for a fixed shape
            return math.prod(self.spec.shape)
        want = self.spec.shape[depth]
        return want if want >= 0 else None


def column_feed(schema: pa.Schema, column: str, spec: TensorSpec, uri: str) -> ColumnFeed:
    """How `column` feeds `spec`, or InputError naming the file and the column."""
    where = f"is not usable: {uri} column {column!r}"
    index = schema.get_field_index(column)
    if index < 0:
        raise InputError(
            f"is not usable: {uri} has no column {column!r} for input {spec.name!r} "
            f"(its columns: {', '.join(repr(n) for n in schema.names[:20])})"
        )
    value_type = schema.field(index).type
    sizes: list[int | None] = []
    while (
        pa.types.is_list(value_type)
        or pa.types.is_large_list(value_type)
        or pa.types.is_fixed_size_list(value_type)
    ):
        sizes.append(value_type.list_size if pa.types.is_fixed_size_list(value_type) else None)
        value_type = value_type.value_type
    target = numpy_dtype(spec.datatype)
    if spec.datatype == "BYTES":
        if value_type not in BYTES_TYPES:
            raise InputError(
                f"{where} holds {value_type}; input {spec.name!r} takes BYTES (binary or string)"
            )
    else:
        # The dtype pyarrow converts the values to (to_pandas_dtype would want pandas).
        source = pa.array([], value_type).to_numpy(zero_copy_only=False).dtype
        if (
            not (
                pa.types.is_integer(value_type)
                or pa.types.is_floating(value_type)
                or pa.types.is_boolean(value_type)
            )
            or source.kind not in ACCEPTED_KINDS[target.kind]
        ):
            raise InputError(
                f"{where} holds {value_type}, which input {spec.name!r} ({spec.datatype}) cannot take"
            )
    shape = list(spec.shape)
    flat_fits = (
        len(sizes) == 1
        and len(shape) > 1
        and all(d >= 0 for d in shape)
        and sizes[0] in (None, math.prod(shape))
    )
    if len(sizes) == len(shape):
        for have, want in zip(sizes, shape, strict=True):
            if have is not None and want >= 0 and have != want:
                raise InputError(
                    f"{where} holds lists of {have} values; input {spec.name!r} wants {want} (shape {shape})"
                )
    elif not flat_fits:
        raise InputError(
            f"{where} holds {schema.field(index).type} ({len(sizes)} list levels); input {spec.name!r} "
            f"has shape {shape}"
        )
    return ColumnFeed(spec, column, tuple(sizes), target)


def _has_null(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, list):
        return any(_has_null(v) for v in value)
    return False


def _null_rows(array: pa.Array) -> npt.NDArray[np.bool_] | None:
    """Which rows hold a null at any depth; None when none can (the common case, found without
    looking at a row)."""
    level: Any = array
    nulls = level.null_count
    while hasattr(level, "values"):
        level = level.values
        nulls += level.null_count
    if not nulls:
        return None
    return np.array([_has_null(v) for v in array.to_pylist()], dtype=np.bool_)


@dataclass
class ParquetShard:
    """A shard's rows read from its file: the ids of all of them in order, the batches of the good
    ones and the errors of the rest."""

    ids: pa.Array
    batches: list[Batch]
    errors: list[RowError]
    metadata: pq.FileMetaData
    """The file's footer, which a reader of the file's other shards may pass on to `read_shard`."""


def _row_range(metadata: pq.FileMetaData, first: int, count: int) -> tuple[list[int], int]:
    """The row groups that hold rows [first, first + count) of a file, and how many rows of the
    first of them come before `first`."""
    groups: list[int] = []
    skip = 0
    start = 0
    for index in range(metadata.num_row_groups):
        rows = metadata.row_group(index).num_rows
        if start + rows > first and start < first + count:
            if not groups:
                skip = first - start
            groups.append(index)
        start += rows
    return groups, skip


def _record_batches(
    file: pq.ParquetFile, columns: list[str], first: int, count: int, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """The rows [first, first + count) of the file, in batches of `batch_rows` counted from
    `first`, so every request but the last is full wherever the shard begins in a row group."""
    groups, skip = _row_range(file.metadata, first, count)
    seen = 0  # rows read, counted from the first row group's first row
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in file.iter_batches(
        batch_size=batch_rows, row_groups=groups, columns=columns, use_threads=False
    ):
        lo, hi = max(skip - seen, 0), min(skip + count - seen, batch.num_rows)
        seen += batch.num_rows
        if lo < hi:
            pending.append(batch.slice(lo, hi - lo))
            held += hi - lo
        while held >= batch_rows or (held and seen >= skip + count):
            table = pa.Table.from_batches(pending)
            take = min(batch_rows, held)
            yield from table.slice(0, take).combine_chunks().to_batches()
            rest = table.slice(take)
            pending, held = ([*rest.combine_chunks().to_batches()] if rest.num_rows else []), rest.num_rows
        if seen >= skip + count:
            return


def read_shard(
    file: RangedObject,
    uri: str,
    shard: ShardPlan,
    *,
    signature: ModelSignature,
    columns: Mapping[str, str],
    id_column: str,
    batch_rows: int,
    metadata: pq.FileMetaData | None = None,
) -> ParquetShard:
    """Read a shard's rows of a Parquet file into batches of up to `batch_rows` rows.

    `columns` names the column of each model input whose name differs from it; `metadata` is the
    file's footer when an earlier read of the same file gave it (ParquetShard.metadata), which
    saves reading it again. InputError when a column cannot feed its input; nulls fail their rows
    only."""
    parquet = _open(file, uri, metadata)
    schema = parquet.schema_arrow
    feeds = [column_feed(schema, columns.get(spec.name, spec.name), spec, uri) for spec in signature.inputs]
    id_name = id_column or (DEFAULT_ID_COLUMN if DEFAULT_ID_COLUMN in schema.names else "")
    if id_name and id_name not in schema.names:
        raise InputError(f"is not usable: {uri} has no id column {id_name!r}")
    wanted = list(dict.fromkeys([*(f.column for f in feeds), *([id_name] if id_name else [])]))
    groups, _ = _row_range(parquet.metadata, shard.source_row, shard.row_count)
    if _chunk_bytes(parquet.metadata, groups, wanted) <= PREFETCH_LIMIT_BYTES:
        parquet = _open(file, uri, parquet.metadata, pre_buffer=True)
    ids: list[pa.Array] = []
    batches: list[Batch] = []
    errors: list[RowError] = []
    row = shard.row_start
    try:
        for record in _record_batches(parquet, wanted, shard.source_row, shard.row_count, batch_rows):
            rows = record.num_rows
            batch_ids = (
                record.column(id_name) if id_name else pa.array(np.arange(row, row + rows, dtype=np.int64))
            )
            ids.append(batch_ids)
            bad = np.zeros(rows, dtype=np.bool_)
            reasons: dict[int, str] = {}
            for feed in feeds:
                nulls = _null_rows(record.column(feed.column))
                if nulls is not None:
                    for at in np.flatnonzero(nulls & ~bad):
                        reasons[int(at)] = f"column {feed.column!r} is null in this row"
                    bad |= nulls
            good = ~bad if bad.any() else None
            kept = record.filter(pa.array(good)) if good is not None else record
            if kept.num_rows:
                positions = np.arange(row, row + rows)[good] if good is not None else None
                in_file = (
                    shard.source_row
                    - shard.row_start
                    + (positions if positions is not None else np.arange(row, row + rows))
                )
                batches.append(
                    Batch(
                        rows=positions.tolist() if positions is not None else list(range(row, row + rows)),
                        ids=batch_ids.filter(pa.array(good)) if good is not None else batch_ids,
                        inputs={
                            feed.spec.name: feed.decode(kept.column(feed.column), uri, in_file)
                            for feed in feeds
                        },
                    )
                )
            errors.extend(
                RowError(row + at, batch_ids[at].as_py(), reason) for at, reason in sorted(reasons.items())
            )
            row += rows
    except pa.ArrowException as exc:
        failure = _arrow_failure(exc)
        if isinstance(failure, StorageError):
            raise failure from exc
        raise InputError(f"is not usable: {uri} cannot be read ({exc})") from exc
    if row != shard.row_start + shard.row_count:
        raise InputError(
            f"is not usable: {uri} changed since the job was planned (rows {shard.source_row} to "
            f"{shard.source_row + shard.row_count} of it were expected)"
        )
    id_type = ids[0].type if ids else pa.int64()
    return ParquetShard(
        pa.concat_arrays(ids) if ids else pa.array([], id_type), batches, errors, parquet.metadata
    )


def _chunk_bytes(metadata: pq.FileMetaData, groups: Sequence[int], columns: Sequence[str]) -> int:
    """The compressed bytes of the named (top-level) columns in these row groups."""
    total = 0
    for index in groups:
        group = metadata.row_group(index)
        for number in range(group.num_columns):
            chunk = group.column(number)
            path = chunk.path_in_schema
            if any(path == name or path.startswith(f"{name}.") for name in columns):
                total += chunk.total_compressed_size
    return total


# --- writing a part ---------------------------------------------------------------------------


def tensor_column(values: npt.NDArray[Any]) -> pa.Array:
    """A batched output (first axis: rows) as one column: fixed-size lists nested for each
    further axis, binary values for BYTES."""
    if values.dtype == np.object_:
        flat = pa.array(
            [v if isinstance(v, bytes) else str(v).encode() for v in values.reshape(-1).tolist()], pa.binary()
        )
    else:
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


def _concat(chunks: list[pa.Array]) -> pa.Array:
    """Chunks of one output column as one array; lists of different sizes (outputs whose shape
    changes between batches) become variable lists."""
    if len({c.type for c in chunks}) > 1:
        chunks = [c.cast(_variable(c.type)) for c in chunks]
    return pa.concat_arrays(chunks)


def _variable(value_type: pa.DataType) -> pa.DataType:
    if pa.types.is_fixed_size_list(value_type):
        return pa.list_(_variable(value_type.value_type))
    return value_type


def _spec_type(spec: TensorSpec) -> pa.DataType:
    value_type = pa.binary() if spec.datatype == "BYTES" else pa.from_numpy_dtype(numpy_dtype(spec.datatype))
    for size in reversed(spec.shape):
        value_type = pa.list_(value_type, size) if size >= 0 else pa.list_(value_type)
    return value_type


def _null_row(value_type: pa.DataType) -> pa.Array:
    """One row of `value_type` that holds nulls: a null, or fixed-size lists of nulls."""
    sizes: list[int] = []
    while pa.types.is_fixed_size_list(value_type):
        sizes.append(value_type.list_size)
        value_type = value_type.value_type
    row = pa.nulls(math.prod(sizes) if sizes else 1, value_type)
    for size in reversed(sizes):
        row = pa.FixedSizeListArray.from_arrays(row, size)
    return row


def _id_array(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, OverflowError):
        # Ids of mixed kinds (a JSONL input's may be) are kept as their text.
        return pa.array([None if v is None else str(v) for v in values], pa.string())


@dataclass(frozen=True)
class AnsweredRows:
    """Rows of a shard the model answered: their positions in the job, their ids and the
    outputs, each with a first axis of one item per row."""

    rows: Sequence[int]
    ids: Sequence[Any] | pa.Array
    outputs: Mapping[str, npt.NDArray[Any]]


def part_table(
    row_start: int,
    row_count: int,
    *,
    answered: Sequence[AnsweredRows],
    errors: Sequence[RowError],
    ids: pa.Array | None,
    id_name: str,
    outputs: Sequence[TensorSpec],
) -> pa.Table:
    """The part of a shard of `row_count` rows from `row_start`: every row in order, answered or
    not. `ids` holds the ids of all the rows when the input had them as a column."""
    slots = np.full(row_count, -1, dtype=np.int64)  # row → its place among the answered rows
    placed = 0
    for piece in answered:
        at = np.asarray(piece.rows, dtype=np.int64) - row_start
        slots[at] = np.arange(placed, placed + len(at))
        placed += len(at)
    in_order = placed == row_count and bool(np.all(slots == np.arange(row_count)))
    # A failed row takes an appended row of nulls: inside the lists, not of the list itself,
    # which pyarrow writes but cannot read back from Parquet for fixed-size lists.
    take = None if in_order else pa.array(np.where(slots < 0, placed, slots))
    columns: dict[str, pa.Array] = {}
    if ids is None:
        values: list[Any] = [None] * row_count
        for piece in answered:
            piece_ids = piece.ids.to_pylist() if isinstance(piece.ids, pa.Array) else list(piece.ids)
            for row, row_id in zip(piece.rows, piece_ids, strict=True):
                values[row - row_start] = row_id
        for error in errors:
            values[error.row - row_start] = error.id
        ids = _id_array(values)
    columns[id_name] = ids
    for spec in outputs:
        chunks = [tensor_column(piece.outputs[spec.name]) for piece in answered if len(piece.rows)]
        if not chunks:  # every row failed: the column's type from the model's signature
            columns[spec.name] = _null_row(_spec_type(spec)).take(pa.array(np.zeros(row_count, np.int64)))
            continue
        column = _concat(chunks)
        if take is not None:
            column = pa.concat_arrays([column, _null_row(column.type)]).take(take)
        columns[spec.name] = column
    reasons: list[str | None] = [None] * row_count
    for error in errors:
        reasons[error.row - row_start] = error.reason
    columns[ERROR_COLUMN] = pa.array(reasons, pa.string())
    return pa.table(columns)


def parquet_bytes(table: pa.Table) -> bytes:
    """The table as a Parquet file; the same table always gives the same bytes, so a shard written
    twice has one checksum."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, table.num_rows))
    return bytes(sink.getvalue().to_pybytes())
