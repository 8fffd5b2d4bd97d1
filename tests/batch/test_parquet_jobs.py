"""Parquet batch jobs end to end on the real pipeline: Parquet in (one file, or a prefix of many),
Parquet or JSONL out, broken files failing their job by name, and workers killed mid-job leaving
every row exactly once in Parquet parts."""

from __future__ import annotations

import hashlib
import io
import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from minio import Minio

from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc

from .conftest import BUCKET, Pipeline, digits_rows, direct_answers, poll_job, tenant, wait_for_state
from .test_jobs import create, fetch, read_results

pytestmark = pytest.mark.timeout(120)


def pixels_column(rows: np.ndarray) -> pa.Array:
    """The rows as a fixed-size list column, as Polars' Array or a tensor writer makes it."""
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])


def parquet_of(table: pa.Table, row_group_size: int | None = None) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    return buffer.getvalue()


def put(s3: Minio, key: str, data: bytes) -> None:
    s3.put_object(BUCKET, key, io.BytesIO(data), len(data))


def upload_parquet(
    s3: Minio, table: pa.Table, row_group_size: int | None = None, tenant_name: str = "acme"
) -> str:
    key = f"uploads/{tenant_name}/{uuid.uuid4().hex}/rows.parquet"
    put(s3, key, parquet_of(table, row_group_size))
    return f"s3://{BUCKET}/{key}"


def read_parts(job: pb.Job) -> pa.Table:
    """Every Parquet part of the job, through the presigned URLs, checked against the sums and
    row counts, in shard order."""
    tables = []
    for part in job.results:
        assert part.uri.endswith(".parquet")
        body = fetch(part.presigned_url)
        assert hashlib.sha256(body).hexdigest() == part.sha256
        table = pq.read_table(io.BytesIO(body))
        assert table.num_rows == part.rows
        tables.append(table)
    return pa.concat_tables(tables)


async def test_a_parquet_job_writes_parquet_parts_that_match_triton(
    batch: pb_grpc.BatchServiceStub, s3: Minio, triton_grpc: str
) -> None:
    rows = digits_rows(1800, seed=21)
    ids = [f"img-{i}" for i in range(len(rows))]
    # The column's name is not the model's input's: the job maps it.
    table = pa.table({"image_id": ids, "pixels": pixels_column(rows), "note": ["x"] * len(rows)})
    job = await create(
        batch,
        "acme",
        upload_parquet(s3, table, row_group_size=250),
        shard_size=500,
        input_columns={"input": "pixels"},
        id_column="image_id",
    )
    assert job.input_format == pb.INPUT_FORMAT_PARQUET
    assert job.output_format == pb.OUTPUT_FORMAT_PARQUET

    done = await wait_for_state(batch, job.name, "acme")

    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
    assert (done.progress.rows_total, done.progress.rows_done, done.progress.rows_failed) == (1800, 1800, 0)
    # Row groups of 250 gathered into shards of up to 500 rows: 2 groups a shard.
    assert done.progress.shards_total == 4
    assert [r.uri.rsplit("/", 1)[1] for r in done.results] == [f"part-{i:05d}.parquet" for i in range(4)]
    parts = read_parts(done)
    assert parts.column_names == ["image_id", "label", "probabilities", "error"]
    assert parts.schema.field("probabilities").type == pa.list_(pa.float32(), 10)
    assert parts.column("image_id").to_pylist() == ids
    assert parts.column("error").null_count == len(rows)
    labels, probabilities = await direct_answers(triton_grpc, rows)
    assert parts.column("label").to_pylist() == labels.tolist()
    got = np.stack(parts.column("probabilities").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(got, probabilities)
    manifest = json.loads(fetch(done.manifest.presigned_url))
    assert manifest["output_format"] == "PARQUET"
    assert [(p["sha256"], p["rows"]) for p in manifest["parts"]] == [(r.sha256, r.rows) for r in done.results]


async def test_a_prefix_of_many_files_is_one_job_in_key_order(
    batch: pb_grpc.BatchServiceStub, s3: Minio, triton_grpc: str
) -> None:
    prefix = f"uploads/acme/{uuid.uuid4().hex}/dataset/"
    rows = digits_rows(900, seed=22)
    # Three files of 300 rows, one in a sub-folder, and what Spark leaves beside them.
    for number, name in enumerate(("part-0.parquet", "part-1.parquet", "more/part-2.parquet")):
        chunk = rows[number * 300 : (number + 1) * 300]
        put(s3, prefix + name, parquet_of(pa.table({"input": pixels_column(chunk)}), row_group_size=100))
    put(s3, prefix + "_SUCCESS", b"")
    # Variable lists (what pandas writes) feed the input as well as fixed-size ones do.
    put(s3, prefix + "z-lists.parquet", parquet_of(pa.table({"input": pa.array(rows[:50].tolist())})))
    job = await create(
        batch,
        "acme",
        f"s3://{BUCKET}/{prefix}",
        shard_size=200,
        output_format=pb.OUTPUT_FORMAT_JSONL,
    )

    done = await wait_for_state(batch, job.name, "acme")

    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
    assert done.progress.rows_total == 950
    lines = read_results(done)
    # No id column: a row is known by its position in the job, across the files in key order.
    assert [line["id"] for line in lines] == list(range(950))
    keyed = np.concatenate([rows[600:900], rows[:600], rows[:50]])  # "more/..." sorts first
    labels, _ = await direct_answers(triton_grpc, keyed)
    assert [line["outputs"]["label"] for line in lines] == labels.tolist()


async def test_null_rows_fail_alone_and_appear_in_the_error_column(
    batch: pb_grpc.BatchServiceStub, s3: Minio, triton_grpc: str
) -> None:
    rows = digits_rows(60, seed=23)
    values = [row.tolist() for row in rows]
    values[7] = None
    values[41] = [*values[41][:63], None]
    # Variable lists, as pandas writes them (pyarrow cannot read back a null fixed-size list).
    table = pa.table({"id": list(range(1000, 1060)), "input": pa.array(values, pa.list_(pa.float32()))})
    job = await create(batch, "acme", upload_parquet(s3, table), shard_size=25)

    done = await wait_for_state(batch, job.name, "acme")

    assert done.state == pb.JOB_STATE_PARTIALLY_FAILED, done.failure_reason
    assert (done.progress.rows_done, done.progress.rows_failed) == (58, 2)
    parts = read_parts(done)
    assert parts.column("id").to_pylist() == list(range(1000, 1060))
    errors = parts.column("error").to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [7, 41]
    assert "column 'input' is null" in errors[7]
    labels = parts.column("label").to_pylist()
    # A failed row's outputs are nulls (inside the list, for list outputs).
    assert labels[7] in (None, [None])
    assert labels[41] in (None, [None])
    good = [i for i in range(60) if i not in (7, 41)]
    expected, _ = await direct_answers(triton_grpc, rows[good])
    assert [labels[i] for i in good] == expected.tolist()
    errors_object = [json.loads(line) for line in fetch(done.errors.presigned_url).splitlines()]
    assert [(e["row"], e["id"]) for e in errors_object] == [(7, 1007), (41, 1041)]


BROKEN = {
    "not parquet": (lambda rows: b"PAR1 this is a CSV file, not Parquet\n1,2,3\n", "is not a Parquet file"),
    "wrong column type": (
        lambda rows: parquet_of(pa.table({"input": [f"row {i}" for i in range(len(rows))]})),
        "column 'input' holds string, which input 'input' (FP32) cannot take",
    ),
    "missing column": (
        lambda rows: parquet_of(pa.table({"pixels": pixels_column(rows)})),
        "has no column 'input' for input 'input'",
    ),
    "wrong list size": (
        lambda rows: parquet_of(pa.table({"input": pixels_column(rows[:, :60])})),
        "column 'input' holds lists of 60 values; input 'input' wants 64",
    ),
    "a short row in a list column": (
        lambda rows: parquet_of(pa.table({"input": pa.array([*rows[:5].tolist(), [1.0] * 63])})),
        "column 'input' has a list of 63 values in row 5 of the file",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_a_broken_file_fails_its_job_naming_the_file_and_column(
    batch: pb_grpc.BatchServiceStub, s3: Minio, case: str
) -> None:
    make, reason = BROKEN[case]
    prefix = f"uploads/acme/{uuid.uuid4().hex}/"
    put(
        s3,
        prefix + "a-good.parquet",
        parquet_of(pa.table({"input": pixels_column(digits_rows(40, seed=24))})),
    )
    put(s3, prefix + "b-broken.parquet", make(digits_rows(6, seed=25)))
    job = await create(batch, "acme", f"s3://{BUCKET}/{prefix}", shard_size=20)
    # Beside it, a good job of the same tenant runs to the end: nothing else is lost.
    good = await create(
        batch,
        "acme",
        upload_parquet(s3, pa.table({"input": pixels_column(digits_rows(300, seed=26))})),
        shard_size=50,
    )

    done = await wait_for_state(batch, job.name, "acme")

    assert done.state == pb.JOB_STATE_FAILED
    assert f"s3://{BUCKET}/{prefix}b-broken.parquet" in done.failure_reason
    assert reason in done.failure_reason
    other = await wait_for_state(batch, good.name, "acme")
    assert other.state == pb.JOB_STATE_SUCCEEDED, other.failure_reason
    assert other.progress.rows_done == 300


async def test_an_npy_job_can_ask_for_parquet_parts(batch: pb_grpc.BatchServiceStub, s3: Minio) -> None:
    rows = digits_rows(300, seed=27)
    buffer = io.BytesIO()
    np.save(buffer, rows)
    key = f"uploads/acme/{uuid.uuid4().hex}.npy"
    put(s3, key, buffer.getvalue())
    job = await create(
        batch, "acme", f"s3://{BUCKET}/{key}", shard_size=100, output_format=pb.OUTPUT_FORMAT_PARQUET
    )

    done = await wait_for_state(batch, job.name, "acme")

    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
    assert read_parts(done).column("id").to_pylist() == list(range(300))


async def test_workers_killed_mid_job_leave_every_parquet_row_exactly_once(
    batch: pb_grpc.BatchServiceStub, s3: Minio, triton_grpc: str, pipeline: Pipeline
) -> None:
    rows = digits_rows(60_000, seed=28)
    table = pa.table({"id": np.arange(60_000) * 7, "input": pixels_column(rows)})
    job = await create(batch, "acme", upload_parquet(s3, table, row_group_size=250), shard_size=250)
    total = 60_000 // 250

    for kill_after in (total // 5, total // 2):
        await poll_job(batch, job.name, "acme", lambda j, n=kill_after: j.progress.shards_done >= n)
        victim = next(p for p in pipeline.workers if p.poll() is None)
        pipeline.kill(victim)
        assert (await batch.GetJob(pb.GetJobRequest(name=job.name), metadata=tenant("acme"))).job.state == (
            pb.JOB_STATE_RUNNING
        ), "the job ended before the kill: make it longer"
        pipeline.start_worker()

    done = await wait_for_state(batch, job.name, "acme", within=90)

    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
    assert (done.progress.rows_done, done.progress.shards_done) == (60_000, total)
    parts = read_parts(done)
    assert parts.num_rows == 60_000
    assert parts.column("id").to_pylist() == (np.arange(60_000) * 7).tolist()
    labels, _ = await direct_answers(triton_grpc, rows)
    assert parts.column("label").to_pylist() == labels.tolist()
    # Exactly the job's parts under its prefix: no part of an attempt left over.
    prefix = done.output_prefix.removeprefix(f"s3://{BUCKET}/") + "parts/"
    stored = sorted(o.object_name for o in s3.list_objects(BUCKET, prefix=prefix))
    assert stored == sorted(r.uri.removeprefix(f"s3://{BUCKET}/") for r in done.results)
