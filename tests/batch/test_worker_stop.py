"""Workers stop on SIGTERM, as a rollout or a scale-down stops them: each leaves the consumer
group, gives back the shards it had not finished and exits, and the job they were running is
finished by the workers that follow them, every row once."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator

import grpc
import psycopg
from minio import Minio

from tensorway.batch import service as batch_service
from tensorway.batch.job_store import GIVEN_BACK
from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tests.waiting import eventually

from .conftest import Pipeline, TritonForwarder, digits_rows, poll_job, upload, wait_for_state
from .test_jobs import create, npy_of, read_results

# Far above the worker's own shutdown bound (its `grace`, 5 s by default, plus leaving the group).
EXIT_PATIENCE = 30


@contextlib.asynccontextmanager
async def _batch_api_of(mesh: Pipeline) -> AsyncIterator[pb_grpc.BatchServiceStub]:
    """A batch API on the mesh's topic, as a stub; the mesh's workers and the API stop after."""
    api, port = await batch_service.create(mesh.api_settings)
    await api.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.BatchServiceStub(channel)
    finally:
        mesh.stop_all()
        await api.stop()


async def _finished_once_by_a_new_worker(
    mesh: Pipeline, stub: pb_grpc.BatchServiceStub, job: pb.Job, tenant_name: str, rows: int
) -> None:
    mesh.start_worker()
    done = await wait_for_state(stub, job.name, tenant_name, within=120)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
    assert done.progress.rows_done == rows
    assert len(read_results(done)) == rows


async def test_workers_stopped_together_mid_job_exit_and_the_job_finishes_once(
    pipeline: Pipeline, inference_target: str, s3: Minio
) -> None:
    mesh = pipeline.sibling(inference_target)
    async with _batch_api_of(mesh) as stub:
        first = [mesh.start_worker(), mesh.start_worker()]
        # Both started and in the group before the job: shards nobody leases within the
        # unclaimed timeout would go to the shared pipeline's workers instead.
        await eventually(mesh.consuming, interval=0.1, what="both workers consuming")
        job = await create(
            stub, "acme", upload(s3, npy_of(digits_rows(24_000, seed=21)), ".npy"), shard_size=200
        )
        await poll_job(stub, job.name, "acme", lambda j: j.progress.shards_done >= 10)
        for process in first:
            process.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(asyncio.to_thread(_exit_code, process) for process in first))
        assert codes == [0, 0], f"exit codes after SIGTERM: {codes}"

        await _finished_once_by_a_new_worker(mesh, stub, job, "acme", 24_000)


async def test_a_worker_stopped_mid_shard_gives_it_back_before_its_lease_runs_out(
    pipeline: Pipeline, forwarder: tuple[str, TritonForwarder], s3: Minio
) -> None:
    address, servicer = forwarder
    mesh = pipeline.sibling(address)
    # A lease far longer than the test may take: the shard can only run again this soon if the
    # stopped worker gave it back.
    mesh.worker_options = {**mesh.worker_options, "LEASE_TIMEOUT": "PT10M"}
    async with _batch_api_of(mesh) as stub:
        stopping = mesh.start_worker()
        await eventually(mesh.consuming, interval=0.1, what="the worker consuming")
        with servicer.holding("stopper"):
            job = await create(
                stub,
                "stopper",
                upload(s3, npy_of(digits_rows(300, seed=22)), ".npy", "stopper"),
                shard_size=300,
            )
            await eventually(lambda: servicer.held["stopper"] > 0, what="the shard's call held")
            stopping.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(_exit_code, stopping) == 0

        # Given back: the stopped worker's lease ended as it stopped, not 10 minutes later.
        # Since then the reaper may have put the shard out again, and another worker taken it:
        # the shared pipeline's workers, whose batch API reaps and relays the same database.
        state, owner, lease_ended, last_error = _shard_row(mesh, job.name)
        assert last_error == GIVEN_BACK
        assert state != "LEASED" or lease_ended or f"-{stopping.pid}-" not in owner, (state, owner)

        await _finished_once_by_a_new_worker(mesh, stub, job, "stopper", 300)


def _shard_row(mesh: Pipeline, job_name: str) -> tuple[str, str, bool, str | None]:
    """The job's one shard: its state, lease owner, whether its lease has ended, and its last
    error."""
    with psycopg.connect(mesh.backends["POSTGRES_URL"]) as connection:
        row = connection.execute(
            """SELECT state, coalesce(lease_owner, ''), coalesce(lease_expires <= now(), true), last_error
            FROM batch_shards WHERE job_id = %s""",
            (job_name.removeprefix("jobs/"),),
        ).fetchone()
    assert row is not None, job_name
    return row[0], row[1], row[2], row[3]


def _exit_code(process: subprocess.Popen[bytes]) -> int | str:
    try:
        return process.wait(timeout=EXIT_PATIENCE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return f"still running {EXIT_PATIENCE} s after SIGTERM"
