"""Parquet shards and parts without servers: where shards are cut, how a shard's rows are read
and checked, and what a part holds."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tensorway.batch import parquet
from tensorway.batch.domain import RowError, ShardPlan
from tensorway.batch.inputs import InputError
from tensorway.batch.parquet import AnsweredRows, cut_row_groups, parquet_bytes, part_table, read_shard
from tensorway.tensors.signatures import ModelSignature, TensorSpec

DIGITS = ModelSignature(
    "digits",
    (TensorSpec("input", "FP32", (64,)),),
    (TensorSpec("label", "INT64", ()), TensorSpec("probabilities", "FP32", (10,))),
    256,
)


def parquet_file(table: pa.Table, row_group_size: int | None = None) -> io.BytesIO:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    buffer.seek(0)
    return buffer


def fixed(rows: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[-1])


def test_shards_gather_whole_row_groups_and_split_large_ones_evenly() -> None:
    assert cut_row_groups([300, 300, 300, 100], 600) == [(0, 600), (600, 400)]
    assert cut_row_groups([300, 300, 300, 100], 500) == [(0, 300), (300, 300), (600, 400)]
    assert cut_row_groups([1000], 300) == [(0, 250), (250, 250), (500, 250), (750, 250)]
    assert cut_row_groups([100, 1000, 100], 600) == [(0, 100), (100, 500), (600, 500), (1100, 100)]
    assert cut_row_groups([], 10) == []


def test_a_shard_reads_its_row_range_in_full_requests() -> None:
    rows = np.random.default_rng(0).random((1000, 64), dtype=np.float32)
    table = pa.table({"key": [f"r{i}" for i in range(1000)], "pixels": fixed(rows)})
    shard = ShardPlan(3, 5350, 400, 0, 0, "x.parquet", 350)  # row 350 of this file is row 5350 of the job
    read = read_shard(
        parquet_file(table, 300),
        "s3://b/x.parquet",
        shard,
        signature=DIGITS,
        columns={"input": "pixels"},
        id_column="key",
        batch_rows=128,
    )
    assert [len(b.rows) for b in read.batches] == [128, 128, 128, 16]
    assert read.batches[0].rows[0] == 5350
    assert read.ids.to_pylist() == [f"r{i}" for i in range(350, 750)]
    np.testing.assert_array_equal(np.concatenate([b.inputs["input"] for b in read.batches]), rows[350:750])


class CountedReads(io.BytesIO):
    """A file that counts its reads: each is one ranged GET of an object in S3."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        return super().read(size)


def test_a_shard_of_a_file_whose_footer_is_known_is_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = np.random.default_rng(1).random((1000, 64), dtype=np.float32)
    data = parquet_file(pa.table({"id": np.arange(1000), "input": fixed(rows)}), 250).getvalue()

    def read(index: int, metadata: pq.FileMetaData | None) -> tuple[int, pq.FileMetaData]:
        file = CountedReads(data)
        shard = read_shard(
            file,  # type: ignore[arg-type]
            "u",
            ShardPlan(index, index * 250, 250, 0, len(data), "u", index * 250),
            signature=DIGITS,
            columns={},
            id_column="",
            batch_rows=100,
            metadata=metadata,
        )
        np.testing.assert_array_equal(
            np.concatenate([b.inputs["input"] for b in shard.batches]), rows[index * 250 : (index + 1) * 250]
        )
        assert shard.ids.to_pylist() == list(range(index * 250, (index + 1) * 250))
        return file.reads, shard.metadata

    reads, footer = read(0, None)
    assert reads == 2  # the footer, then the shard's two column chunks together
    assert read(1, footer)[0] == 1
    # Column chunks over the limit are read piece by piece, whatever their size.
    monkeypatch.setattr(parquet, "PREFETCH_LIMIT_BYTES", 1000)
    assert read(2, footer)[0] > 1


def test_nulls_fail_their_rows_and_flat_variable_lists_feed_the_input() -> None:
    values: list[list[float] | None] = [[float(i)] * 64 for i in range(6)]
    values[2] = None
    values[4] = [1.0] * 63 + [None]  # type: ignore[list-item]
    read = read_shard(
        parquet_file(pa.table({"input": pa.array(values, pa.list_(pa.float64()))})),
        "u",
        ShardPlan(0, 0, 6, 0, 0, "u", 0),
        signature=DIGITS,
        columns={},
        id_column="",
        batch_rows=256,
    )
    assert [(e.row, e.id) for e in read.errors] == [(2, 2), (4, 4)]
    assert read.batches[0].rows == [0, 1, 3, 5]
    assert read.batches[0].inputs["input"].dtype == np.float32


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        (pa.table({"pixels": pa.array([1.0])}), "has no column 'input' for input 'input'"),
        (pa.table({"input": pa.array(["a"])}), "column 'input' holds string"),
        (
            pa.table({"input": fixed(np.zeros((2, 32), np.float32))}),
            "holds lists of 32 values; input 'input' wants 64",
        ),
        (
            pa.table({"input": pa.array([[1.0] * 64, [1.0] * 65])}),
            "has a list of 65 values in row 1 of the file",
        ),
        (pa.table({"input": pa.array([[[1.0] * 8] * 8])}), "2 list levels"),
    ],
)
def test_a_column_that_cannot_feed_its_input_names_the_file_and_column(table: pa.Table, reason: str) -> None:
    with pytest.raises(InputError) as refused:
        read_shard(
            parquet_file(table),
            "s3://b/broken.parquet",
            ShardPlan(0, 0, table.num_rows, 0, 0, "broken.parquet", 0),
            signature=DIGITS,
            columns={},
            id_column="",
            batch_rows=256,
        )
    assert "s3://b/broken.parquet" in str(refused.value)
    assert reason in str(refused.value)


def test_not_parquet_is_named() -> None:
    with pytest.raises(InputError, match=r"s3://b/x\.parquet is not a Parquet file"):
        read_shard(
            io.BytesIO(b"id,input\n1,2\n" * 10),
            "s3://b/x.parquet",
            ShardPlan(0, 0, 10, 0, 0, "x.parquet", 0),
            signature=DIGITS,
            columns={},
            id_column="",
            batch_rows=256,
        )


def test_a_part_holds_every_row_in_order_and_the_same_rows_give_the_same_bytes() -> None:
    answered = [
        AnsweredRows(
            [10, 11],
            pa.array(["a", "b"]),
            {"label": np.array([1, 2]), "probabilities": np.ones((2, 10), np.float32)},
        ),
        AnsweredRows(
            [13], pa.array(["d"]), {"label": np.array([3]), "probabilities": np.zeros((1, 10), np.float32)}
        ),
    ]
    errors = [RowError(12, "c", "column 'input' is null in this row")]

    def part() -> pa.Table:
        return part_table(
            10,
            4,
            answered=answered,
            errors=errors,
            ids=pa.array(["a", "b", "c", "d"]),
            id_name="id",
            outputs=DIGITS.outputs,
        )

    table = part()
    assert table.column_names == ["id", "label", "probabilities", "error"]
    assert table.column("label").to_pylist() == [1, 2, None, 3]
    assert table.column("probabilities")[2].as_py() == [None] * 10
    assert table.column("error").to_pylist() == [None, None, "column 'input' is null in this row", None]
    data = parquet_bytes(table)
    assert data == parquet_bytes(part())
    # Readable back, failed row and all.
    assert pq.read_table(io.BytesIO(data)).equals(table)


def test_a_part_of_only_failed_rows_keeps_the_output_types() -> None:
    errors = [RowError(0, "x", "bad"), RowError(1, 7, "bad")]
    table = part_table(0, 2, answered=[], errors=errors, ids=None, id_name="id", outputs=DIGITS.outputs)
    assert table.schema.field("probabilities").type == pa.list_(pa.float32(), 10)
    # Ids of mixed kinds are kept as text.
    assert table.column("id").to_pylist() == ["x", "7"]
    assert pq.read_table(io.BytesIO(parquet_bytes(table))).num_rows == 2
