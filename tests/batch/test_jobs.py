"""Batch jobs end to end on real PostgreSQL, Kafka (Tansu), S3 (SeaweedFS) and Triton: the API
in-process, two `tensorway serve batch-worker` processes, inference through a forwarder."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from minio import Minio

from tensorway.batch import service as batch_service
from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tensorway.batch.v1.shard_task_pb2 import ShardTask
from tests.waiting import eventually

from .conftest import (
    BUCKET,
    Pipeline,
    digits_rows,
    direct_answers,
    poll_job,
    tenant,
    upload,
    wait_for_state,
)

pytestmark = pytest.mark.timeout(120)


def jsonl_of(rows: np.ndarray, ids: list[str]) -> bytes:
    return b"".join(
        json.dumps({"id": row_id, "inputs": {"input": row.tolist()}}).encode() + b"\n"
        for row_id, row in zip(ids, rows, strict=True)
    )


def npy_of(rows: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, rows)
    return buffer.getvalue()


def worker_logs(pipeline: Pipeline) -> str:
    return "".join(path.read_text() for path in pipeline.logs.glob("worker-*.log"))


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body


def read_results(job: pb.Job) -> list[dict]:
    """Every answer line of the job, read through the presigned URLs, checked against the sums."""
    lines = []
    for part in job.results:
        body = fetch(part.presigned_url)
        assert hashlib.sha256(body).hexdigest() == part.sha256
        part_lines = [json.loads(line) for line in body.splitlines()]
        assert len(part_lines) == part.rows
        lines.extend(part_lines)
    return lines


async def create(
    stub: pb_grpc.BatchServiceStub, tenant_name: str, input_uri: str, shard_size: int, **fields: object
) -> pb.Job:
    job = pb.Job(model="digits", input_uri=input_uri, shard_size=shard_size, **fields)
    response = await stub.CreateJob(
        pb.CreateJobRequest(job=job, request_id=uuid.uuid4().hex), metadata=tenant(tenant_name)
    )
    return response.job


async def test_jsonl_job_answers_every_row_exactly(
    batch: pb_grpc.BatchServiceStub, s3: Minio, triton_grpc: str
) -> None:
    rows = digits_rows(1500, seed=1)
    ids = [f"row-{i}" for i in range(len(rows))]
    job = await create(batch, "acme", upload(s3, jsonl_of(rows, ids), ".jsonl"), shard_size=200)
    assert job.state == pb.JOB_STATE_QUEUED
    assert job.input_format == pb.INPUT_FORMAT_JSONL

    done = await wait_for_state(batch, job.name, "acme")

    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
    assert (done.progress.rows_total, done.progress.rows_done, done.progress.rows_failed) == (1500, 1500, 0)
    assert done.progress.shards_total == done.progress.shards_done == 8
    lines = read_results(done)
    assert [line["id"] for line in lines] == ids
    labels, probabilities = await direct_answers(triton_grpc, rows)
    assert [line["outputs"]["label"] for line in lines] == labels.tolist()
    got = np.array([line["outputs"]["probabilities"] for line in lines], dtype=np.float32)
    np.testing.assert_array_equal(got, probabilities)
    manifest = json.loads(fetch(done.manifest.presigned_url))
    assert hashlib.sha256(fetch(done.manifest.presigned_url)).hexdigest() == done.manifest.sha256
    assert manifest["state"] == "SUCCEEDED"
    assert [p["sha256"] for p in manifest["parts"]] == [r.sha256 for r in done.results]
    assert fetch(manifest["parts"][0]["url"]) == fetch(done.results[0].presigned_url)


async def test_npy_job_answers_every_row_exactly(
    batch: pb_grpc.BatchServiceStub, s3: Minio, triton_grpc: str
) -> None:
    rows = digits_rows(2300, seed=2)
    job = await create(batch, "acme", upload(s3, npy_of(rows), ".npy"), shard_size=500)

    done = await wait_for_state(batch, job.name, "acme")

    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
    assert done.input_format == pb.INPUT_FORMAT_NPY
    lines = read_results(done)
    assert [line["id"] for line in lines] == list(range(2300))
    labels, probabilities = await direct_answers(triton_grpc, rows)
    assert [line["outputs"]["label"] for line in lines] == labels.tolist()
    got = np.array([line["outputs"]["probabilities"] for line in lines], dtype=np.float32)
    np.testing.assert_array_equal(got, probabilities)


async def test_a_repeated_create_returns_the_same_job(batch: pb_grpc.BatchServiceStub, s3: Minio) -> None:
    request = pb.CreateJobRequest(
        job=pb.Job(model="digits", input_uri=upload(s3, npy_of(digits_rows(10)), ".npy")),
        request_id=uuid.uuid4().hex,
    )
    first = (await batch.CreateJob(request, metadata=tenant("acme"))).job
    second = (await batch.CreateJob(request, metadata=tenant("acme"))).job
    assert first.name == second.name
    # The same request from another tenant names acme's upload, which is not globex's to read.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await batch.CreateJob(request, metadata=tenant("globex"))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    request.job.input_uri = upload(s3, npy_of(digits_rows(10)), ".npy", "globex")
    other_tenant = (await batch.CreateJob(request, metadata=tenant("globex"))).job
    assert other_tenant.name != first.name
    listed = (await batch.ListJobs(pb.ListJobsRequest(page_size=1000), metadata=tenant("acme"))).jobs
    assert sum(1 for j in listed if j.name == first.name) == 1


async def test_another_tenant_gets_not_found(batch: pb_grpc.BatchServiceStub, s3: Minio) -> None:
    job = await create(batch, "acme", upload(s3, npy_of(digits_rows(10)), ".npy"), shard_size=10)
    for call in (
        batch.GetJob(pb.GetJobRequest(name=job.name), metadata=tenant("globex")),
        batch.CancelJob(pb.CancelJobRequest(name=job.name), metadata=tenant("globex")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = (await batch.ListJobs(pb.ListJobsRequest(), metadata=tenant("globex"))).jobs
    assert job.name not in {j.name for j in listed}


async def test_a_missing_input_fails_the_job_with_the_reason(batch: pb_grpc.BatchServiceStub) -> None:
    job = await create(batch, "acme", f"s3://{BUCKET}/uploads/acme/no-such-object.jsonl", shard_size=10)
    done = await wait_for_state(batch, job.name, "acme", within=20)
    assert done.state == pb.JOB_STATE_FAILED
    assert "no-such-object.jsonl does not exist" in done.failure_reason


async def test_malformed_rows_give_partially_failed_with_their_ids_and_reasons(
    batch: pb_grpc.BatchServiceStub, s3: Minio, triton_grpc: str
) -> None:
    rows = digits_rows(40, seed=3)
    lines = [json.dumps({"id": f"ok-{i}", "inputs": {"input": row.tolist()}}) for i, row in enumerate(rows)]
    lines[3] = '{"id": "broken-json", "inputs": '
    lines[11] = json.dumps({"id": "short", "inputs": {"input": [1.0, 2.0]}})
    lines[25] = json.dumps({"id": "wrong-name", "inputs": {"pixels": rows[25].tolist()}})
    lines[33] = json.dumps({"id": "text", "inputs": {"input": ["a"] * 64}})
    job = await create(batch, "acme", upload(s3, ("\n".join(lines) + "\n").encode(), ".jsonl"), shard_size=15)

    done = await wait_for_state(batch, job.name, "acme")

    assert done.state == pb.JOB_STATE_PARTIALLY_FAILED, done.failure_reason
    assert (done.progress.rows_done, done.progress.rows_failed) == (36, 4)
    errors = [json.loads(line) for line in fetch(done.errors.presigned_url).splitlines()]
    assert done.errors.rows == 4
    by_row = {e["row"]: e for e in errors}
    assert sorted(by_row) == [3, 11, 25, 33]
    assert by_row[3]["id"] == 3
    assert "not valid JSON" in by_row[3]["reason"]
    assert by_row[11]["id"] == "short"
    assert "shape [2]" in by_row[11]["reason"]
    assert by_row[25]["id"] == "wrong-name"
    assert "missing input 'input'" in by_row[25]["reason"]
    assert by_row[33]["id"] == "text"
    assert "not FP32" in by_row[33]["reason"]
    answered = read_results(done)
    good = [i for i in range(40) if i not in by_row]
    assert [line["id"] for line in answered] == [f"ok-{i}" for i in good]
    labels, _ = await direct_answers(triton_grpc, rows[good])
    assert [line["outputs"]["label"] for line in answered] == labels.tolist()


async def test_watch_streams_progress_forward_to_the_final_counts(
    batch: pb_grpc.BatchServiceStub, s3: Minio
) -> None:
    job = await create(batch, "acme", upload(s3, npy_of(digits_rows(3000, seed=4)), ".npy"), shard_size=200)
    seen = [
        response.job
        async for response in batch.WatchJob(pb.WatchJobRequest(name=job.name), metadata=tenant("acme"))
    ]
    assert seen[-1].state == pb.JOB_STATE_SUCCEEDED
    counts = [(j.progress.rows_done, j.progress.shards_done) for j in seen]
    assert counts == sorted(counts), "progress went backwards"
    assert counts[-1] == (3000, 15)
    assert seen[-1].manifest.presigned_url
    order = [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED]
    states = [j.state for j in seen]
    assert states == sorted(states, key=order.index)


async def test_watch_is_told_of_changes_without_waiting_out_its_interval(
    pipeline: Pipeline, s3: Minio
) -> None:
    settings = pipeline.api_settings.model_copy(update={"watch_interval": timedelta(minutes=10)})
    server, port = await batch_service.create(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.BatchServiceStub(channel)
            job = await create(
                stub, "acme", upload(s3, npy_of(digits_rows(1000, seed=6)), ".npy"), shard_size=250
            )
            watch = stub.WatchJob(pb.WatchJobRequest(name=job.name), metadata=tenant("acme"))
            # Looking only every ten minutes, the watch would not end within the minute.
            seen = await asyncio.wait_for(_collect(watch), timeout=60)
    finally:
        await server.stop()
    assert seen[-1].state == pb.JOB_STATE_SUCCEEDED
    assert len(seen) > 2, "the watch saw no progress between the first look and the end"


async def _collect(watch: AsyncIterator[pb.WatchJobResponse]) -> list[pb.Job]:
    return [response.job async for response in watch]


async def test_cancel_stops_the_job_and_no_further_shard_is_written(
    batch: pb_grpc.BatchServiceStub, s3: Minio, pipeline: Pipeline
) -> None:
    job = await create(batch, "acme", upload(s3, npy_of(digits_rows(40_000, seed=5)), ".npy"), shard_size=100)
    await poll_job(batch, job.name, "acme", lambda j: j.progress.shards_done >= 2)

    cancelled = (await batch.CancelJob(pb.CancelJobRequest(name=job.name), metadata=tenant("acme"))).job

    assert cancelled.state == pb.JOB_STATE_CANCELLED
    assert cancelled.progress.shards_done < cancelled.progress.shards_total
    prefix = cancelled.output_prefix.removeprefix(f"s3://{BUCKET}/") + "parts/"

    def parts() -> set[str]:
        return {o.object_name for o in s3.list_objects(BUCKET, prefix=prefix)}

    # Workers in the middle of a shard may still be writing its part. No shard of a cancelled
    # job can be leased any more, so once each worker has been seen handling no shard at all,
    # what they finished of this job is gone, and nothing more of it can be written.
    for pid in pipeline.shards_running():
        await eventually(
            lambda pid=pid: pipeline.shards_running().get(pid) == 0,
            interval=0.1,
            what=f"worker {pid} handling no shard",
        )
    final = (await batch.GetJob(pb.GetJobRequest(name=job.name), metadata=tenant("acme"))).job
    assert final.state == pb.JOB_STATE_CANCELLED
    assert len(parts()) == final.progress.shards_done
    again = (await batch.CancelJob(pb.CancelJobRequest(name=job.name), metadata=tenant("acme"))).job
    assert again.state == pb.JOB_STATE_CANCELLED


async def test_workers_killed_twice_mid_job_leave_every_row_exactly_once(
    batch: pb_grpc.BatchServiceStub, s3: Minio, triton_grpc: str, pipeline: Pipeline
) -> None:
    rows = digits_rows(60_000, seed=6)
    job = await create(batch, "acme", upload(s3, npy_of(rows), ".npy"), shard_size=250)
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
    lines = read_results(done)
    assert len(lines) == 60_000
    assert [line["id"] for line in lines] == list(range(60_000))
    labels, _ = await direct_answers(triton_grpc, rows)
    assert [line["outputs"]["label"] for line in lines] == labels.tolist()


async def test_redelivered_and_malformed_messages_change_nothing(
    batch: pb_grpc.BatchServiceStub, s3: Minio, pipeline: Pipeline, kafka_bootstrap: str
) -> None:
    job = await create(batch, "acme", upload(s3, npy_of(digits_rows(600, seed=7)), ".npy"), shard_size=200)
    done = await wait_for_state(batch, job.name, "acme")
    assert done.state == pb.JOB_STATE_SUCCEEDED

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for value in (
            *(ShardTask(job=job.name, shard=shard).SerializeToString() for shard in range(3)),
            b"\xff\x00 not a protobuf",
            ShardTask(job="models/digits", shard=1).SerializeToString(),
        ):
            await producer.send_and_wait(pipeline.api_settings.shards_topic, value, headers=[("x", b"\xff")])
    finally:
        await producer.stop()
    deadline = asyncio.get_running_loop().time() + 30
    while "skipping a malformed shard message" not in worker_logs(pipeline):
        assert asyncio.get_running_loop().time() < deadline, "no worker reported the malformed message"
        await asyncio.sleep(0.2)
    # The workers go on: a job after the messages completes.
    after = await create(batch, "acme", upload(s3, npy_of(digits_rows(1600, seed=8)), ".npy"), shard_size=100)
    assert (await wait_for_state(batch, after.name, "acme")).state == pb.JOB_STATE_SUCCEEDED

    again = (await batch.GetJob(pb.GetJobRequest(name=job.name), metadata=tenant("acme"))).job
    assert again.progress == done.progress
    assert [r.sha256 for r in again.results] == [r.sha256 for r in done.results]
    assert len(read_results(again)) == 600
    assert all(p.poll() is None for p in pipeline.workers[-2:])
