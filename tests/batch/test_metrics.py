"""The batch pipeline's metrics tell what happened: the API's census of jobs and shards left,
read from PostgreSQL, and a worker's shards, rows, shard time and consumer lag on its /metrics."""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import timedelta

import grpc
from minio import Minio
from prometheus_client import REGISTRY

from tensorway.batch import service as batch_service
from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tests.waiting import eventually

from .conftest import Pipeline, digits_rows, free_port, scrape, upload, wait_for_state
from .test_jobs import create, npy_of


def census(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_job_shows_in_the_api_census_and_the_worker_metrics(
    pipeline: Pipeline, inference_target: str, s3: Minio
) -> None:
    mesh = pipeline.sibling(inference_target)
    metrics_port = free_port()
    mesh.worker_options = {
        **mesh.worker_options,
        "METRICS_ENABLED": "true",
        "METRICS_PORT": str(metrics_port),
        "LAG_REPORT_INTERVAL": "PT0.2S",
    }
    settings = mesh.api_settings.model_copy(update={"census_interval": timedelta(milliseconds=200)})
    api, port = await batch_service.create(settings)
    await api.start()
    try:
        # The census has run once the gauge has a series for every state.
        await eventually(
            lambda: REGISTRY.get_sample_value("tensorway_batch_jobs", {"state": "QUEUED"}) is not None
        )
        succeeded_before = census("tensorway_batch_jobs", state="SUCCEEDED")
        mesh.start_worker()
        url = f"http://127.0.0.1:{metrics_port}/metrics"

        def lags() -> list[float] | None:
            """The worker's lag per partition it holds; None before it serves its metrics."""
            try:
                samples = scrape(url)
            except urllib.error.URLError:
                return None
            return [v for (name, _), v in samples.items() if name == "tensorway_batch_consumer_lag_messages"]

        # The job waits until the worker holds its partitions: shards nobody leases within the
        # unclaimed timeout are published again on the shared pipeline's topic, whose workers
        # would then run them and this worker would count none.
        await eventually(lambda: bool(lags()), interval=0.1, what="the worker holding its partitions")
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
        await eventually(
            lambda: (held := lags()) is not None and all(lag == 0 for lag in held),
            interval=0.1,
            what="the worker's partitions worked off",
        )
        samples = scrape(url)
        assert samples[("tensorway_batch_shards_total", (("outcome", "done"),))] == 4
        assert samples[("tensorway_batch_rows_total", (("model", "digits"), ("outcome", "ok")))] == 1200
        assert samples[("tensorway_batch_rows_total", (("model", "digits"), ("outcome", "failed")))] == 0
        assert samples[("tensorway_batch_shard_seconds_count", (("model", "digits"),))] == 4
        lag_topics = {
            dict(labels)["topic"]
            for (name, labels), _ in samples.items()
            if name == "tensorway_batch_consumer_lag_messages"
        }
        assert lag_topics == {mesh.api_settings.shards_topic}
    finally:
        mesh.stop_all()
        await api.stop()
