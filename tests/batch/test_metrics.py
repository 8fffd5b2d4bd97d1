"""The batch pipeline's metrics tell what happened: the API's census of jobs and shards left,
read from PostgreSQL, and a worker's shards, rows, shard time and consumer lag on its /metrics."""

from __future__ import annotations

from datetime import timedelta

import grpc
from minio import Minio
from prometheus_client import REGISTRY

from tensorway.batch import service as batch_service
from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tests.waiting import eventually

from .conftest import Pipeline, digits_rows, lags, upload, wait_for_state
from .test_jobs import create, npy_of


def census(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_job_shows_in_the_api_census_and_the_worker_metrics(
    pipeline: Pipeline, inference_target: str, s3: Minio
) -> None:
    mesh = pipeline.sibling(inference_target)
    mesh.worker_options = {**mesh.worker_options, "LAG_REPORT_INTERVAL": "PT0.2S"}
    settings = mesh.api_settings.model_copy(update={"census_interval": timedelta(milliseconds=200)})
    api, port = await batch_service.create(settings)
    await api.start()
    try:
        # The census has run once the gauge has a series for every state.
        await eventually(
            lambda: REGISTRY.get_sample_value("tensorway_batch_jobs", {"state": "QUEUED"}) is not None
        )
        succeeded_before = census("tensorway_batch_jobs", state="SUCCEEDED")
        worker = mesh.start_worker()
        # The job waits until the worker holds its partitions: shards nobody leases within the
        # unclaimed timeout are published again on the shared pipeline's topic, whose workers
        # would then run them and this worker would count none.
        await eventually(mesh.consuming, interval=0.1, what="the worker holding its partitions")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.BatchServiceStub(channel)
            job = await create(
                stub, "acme", upload(s3, npy_of(digits_rows(1200, seed=11)), ".npy"), shard_size=300
            )
            done = await wait_for_state(stub, job.name, "acme")
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason

        # The API's census counts it among the succeeded jobs (other tests' jobs may end meanwhile).
        await eventually(lambda: census("tensorway_batch_jobs", state="SUCCEEDED") >= succeeded_before + 1)

        # The worker's own counts: every shard done once, every row answered, each shard timed,
        # and no lag left on the partitions it holds once the topic is worked off.
        def worked_off() -> bool:
            samples = mesh.metrics()[worker.pid]
            held = {} if samples is None else lags(samples)
            return bool(held) and all(lag == 0 for lag in held.values())

        await eventually(worked_off, interval=0.1, what="the worker's partitions worked off")
        samples = mesh.metrics()[worker.pid]
        assert samples is not None
        assert samples[("tensorway_batch_shards_total", (("outcome", "done"),))] == 4
        assert samples[("tensorway_batch_rows_total", (("model", "digits"), ("outcome", "ok")))] == 1200
        assert samples[("tensorway_batch_rows_total", (("model", "digits"), ("outcome", "failed")))] == 0
        assert samples[("tensorway_batch_shard_seconds_count", (("model", "digits"),))] == 4
        lag_topics = {partition.rsplit("/", 1)[0] for partition in lags(samples)}
        assert lag_topics == {mesh.api_settings.shards_topic}
    finally:
        mesh.stop_all()
        await api.stop()
