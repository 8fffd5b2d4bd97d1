"""Malformed records on the batch workers' shard topic: garbage bytes, other protobufs, shard
tasks naming unknown jobs, shards or finished jobs, huge keys and odd headers. The worker skips
what it cannot use, a finished job stays exactly as it was, and a new job still runs to the end."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import given
from hypothesis import strategies as st

from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tensorway.batch.v1.shard_task_pb2 import ShardTask
from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tests.fuzz.budget import fuzz_budget
from tests.fuzz.conftest import FuzzMesh
from tests.fuzz.jobs import GOOD_LINE, TENANT, run_to_the_end, upload
from tests.fuzz.outcomes import assert_mesh_serves
from tests.fuzz.strategies import edgy_text, messages
from tests.waiting import eventually_blocking

Record = tuple[bytes | None, bytes, list[tuple[str, bytes]]]


@pytest.fixture(scope="module")
def finished_job(fuzz_mesh: FuzzMesh) -> pb.Job:
    """A job that ran to SUCCEEDED, for redelivered and forged tasks to aim at."""
    job = run_to_the_end(
        fuzz_mesh, pb.Job(model="iris", input_uri=upload(fuzz_mesh, GOOD_LINE + b"\n", ".jsonl"))
    )
    assert job is not None
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    return job


def records(finished: pb.Job) -> st.SearchStrategy[Record]:
    job_names = st.one_of(
        st.just(finished.name),
        st.builds(lambda: f"jobs/{uuid.uuid4().hex}"),
        st.sampled_from(["jobs/", "jobs/not-a-uuid", "jobs/1", "models/iris", "jobs/x/shards/0", ""]),
        edgy_text(),
    )
    shards = st.one_of(st.integers(-3, 3), st.sampled_from([-(2**31), 2**31 - 1]))
    tasks = st.builds(
        lambda job, shard: ShardTask(job=job, shard=shard).SerializeToString(), job_names, shards
    )
    values = st.one_of(
        tasks,
        st.binary(max_size=64),
        messages(inference_pb.InferRequest.DESCRIPTOR, depth=1).map(lambda m: m.SerializeToString()),
        messages(ShardTask.DESCRIPTOR).map(lambda m: m.SerializeToString()),
        st.just(b""),
    )
    keys = st.one_of(
        st.none(), st.binary(max_size=32), st.sampled_from([200_000, 900_000]).map(lambda n: b"k" * n)
    )
    headers = st.lists(
        st.tuples(
            st.one_of(st.sampled_from(["x-tenant-id", "traceparent", "tracestate"]), st.text(max_size=10)),
            st.one_of(st.binary(max_size=40), st.just(b"00-zz-zz-01"), st.just(b"\xff" * 300)),
        ),
        max_size=3,
    )
    return st.tuples(keys, values, headers)


async def publish(bootstrap: str, topic: str, batch: Sequence[Record]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, max_request_size=2**21)
    await producer.start()
    try:
        for key, value, headers in batch:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


@fuzz_budget(max_examples=15)
@given(data=st.data())
def test_malformed_shard_records_are_skipped_and_change_nothing(
    fuzz_mesh: FuzzMesh, finished_job: pb.Job, data: st.DataObject
) -> None:
    batch = data.draw(st.lists(records(finished_job), min_size=1, max_size=5))
    asyncio.run(publish(fuzz_mesh.kafka_bootstrap, fuzz_mesh.shards_topic, batch))
    assert not fuzz_mesh.dead_processes(), f"crashed: {fuzz_mesh.dead_processes()}"


def test_after_the_malformed_records_finished_jobs_are_unchanged_and_new_ones_run(
    fuzz_mesh: FuzzMesh, finished_job: pb.Job
) -> None:
    # Runs after the records above: the worker has read them, and skipped the ones it cannot use.
    log = fuzz_mesh.state_dir / fuzz_mesh.processes["batch-worker"].log
    eventually_blocking(
        lambda: "skipping a malformed shard message" in log.read_text(errors="replace"),
        what="the worker reports a malformed record",
    )
    after = run_to_the_end(
        fuzz_mesh, pb.Job(model="iris", input_uri=upload(fuzz_mesh, GOOD_LINE + b"\n", ".jsonl"))
    )
    assert after is not None
    assert after.state == pb.JOB_STATE_SUCCEEDED, after
    with fuzz_mesh.channel("batch") as channel:
        again = (
            pb_grpc.BatchServiceStub(channel)
            .GetJob(pb.GetJobRequest(name=finished_job.name), metadata=TENANT)
            .job
        )
    assert again.state == finished_job.state
    assert again.progress.rows_done == finished_job.progress.rows_done
    assert again.progress.rows_failed == finished_job.progress.rows_failed
    assert [r.sha256 for r in again.results] == [r.sha256 for r in finished_job.results]
    assert again.end_time == finished_job.end_time
    assert_mesh_serves(fuzz_mesh)
