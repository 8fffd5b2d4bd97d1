"""The batch API: its settings, the thin gRPC servicer, and `create`, which `tensorway serve
batch` runs. The process also plans queued jobs into shards, relays the outbox to Kafka and
re-queues the shards of dead workers; several replicas share that work through row locks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, Protocol

from pydantic_settings import SettingsConfigDict

from tensorway.batch import converters
from tensorway.batch.core import BatchJobs, BatchLimits, JobPlanner, LeaseReaper, Periodic
from tensorway.batch.metrics import JobCensus
from tensorway.batch.outbox import OutboxRelay, ensure_topic
from tensorway.batch.results import ResultWriter
from tensorway.batch.settings import BatchSettings
from tensorway.batch.store import JobChanges, JobStore
from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tensorway.runtime import (
    FieldViolation,
    InvalidArgument,
    ServiceBinding,
    ServiceServer,
    create_server,
)
from tensorway.runtime.context import DEFAULT_TENANT, current
from tensorway.runtime.requests import refuse_nul

SERVICE = pb.DESCRIPTOR.services_by_name["BatchService"]


class Settings(BatchSettings):
    """The batch API's settings, from TENSORWAY_BATCH_* variables."""

    model_config = SettingsConfigDict(env_prefix="TENSORWAY_BATCH_", extra="ignore")

    default_shard_size: int = 10_000
    """Rows per shard when a job does not say."""
    max_shard_size: int = 1_000_000
    """The most rows per shard a job may ask for."""
    default_output_prefix: str = "s3://tensorway-batch/results/{job}/"
    """Where results go when a job names no output prefix; {job} is the job's id."""
    watch_interval: timedelta = timedelta(milliseconds=500)
    """How often WatchJob looks at a job's progress when PostgreSQL has not told it of a change."""
    poll_interval: timedelta = timedelta(seconds=1)
    """How often the planner and the outbox relay look for work that other replicas left."""
    outbox_batch_size: int = 500
    """Outbox messages published per transaction."""
    lease_check_interval: timedelta = timedelta(seconds=2)
    """How often expired shard leases are looked for; with the workers' lease timeout, this
    bounds how long a dead worker's shard waits."""
    unclaimed_shard_timeout: timedelta = timedelta(minutes=2)
    """A pending shard offered to the workers this long ago that none has taken is published
    again: its message was lost (a broker restarted without its data). Longer than shards wait
    in a normal backlog, or they are published twice (harmless: a shard is counted once)."""
    max_shard_attempts: int = 5
    """Leases a shard gets before it fails with all its rows."""
    census_interval: timedelta = timedelta(seconds=10)
    """How often the jobs-by-state and shards-left gauges are counted from PostgreSQL."""


def _tenant() -> str:
    request = current.get()
    return request.tenant if request is not None else DEFAULT_TENANT


def _job_id(name: str, field: str = "name") -> str:
    collection, _, job_id = name.partition("/")
    if collection != "jobs" or not job_id or "/" in job_id or "\0" in job_id:
        raise InvalidArgument(f"{field} must be jobs/{{job}}", [FieldViolation(field, "jobs/{job}")])
    return job_id


class BatchServicer(pb_grpc.BatchServiceServicer):
    """BatchService over gRPC: each method converts, calls the core and converts back."""

    def __init__(self, jobs: BatchJobs) -> None:
        self._jobs = jobs

    async def CreateJob(self, request: pb.CreateJobRequest, context: Any) -> pb.CreateJobResponse:
        refuse_nul(request)
        draft = converters.draft_from_proto(request.job)
        status = await self._jobs.create(_tenant(), request.request_id, draft)
        return pb.CreateJobResponse(job=converters.job_to_proto(status))

    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.GetJobResponse:
        status = await self._jobs.get(_tenant(), _job_id(request.name))
        return pb.GetJobResponse(job=converters.job_to_proto(status))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        refuse_nul(request)
        jobs, token = await self._jobs.list(_tenant(), request.filter, request.page_size, request.page_token)
        return pb.ListJobsResponse(jobs=[converters.job_to_proto(j) for j in jobs], next_page_token=token)

    async def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.CancelJobResponse:
        status = await self._jobs.cancel(_tenant(), _job_id(request.name))
        return pb.CancelJobResponse(job=converters.job_to_proto(status))

    async def WatchJob(self, request: pb.WatchJobRequest, context: Any) -> AsyncIterator[pb.WatchJobResponse]:
        async for status in self._jobs.watch(_tenant(), _job_id(request.name)):
            yield pb.WatchJobResponse(job=converters.job_to_proto(status))


class BackgroundLoop(Protocol):
    """Work that runs until cancelled."""

    @property
    def name(self) -> str: ...

    async def run(self) -> None: ...


class BackgroundWork:
    """The API process's loops, started together and stopped together."""

    def __init__(self, loops: list[BackgroundLoop]) -> None:
        self._loops = loops
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(loop.run(), name=loop.name) for loop in self._loops]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []


async def create(settings: Settings) -> tuple[ServiceServer, int]:
    """The batch API server, not yet started, and its port. Its background loops run from here
    until the server stops."""
    store = await JobStore.open(
        settings.postgres_url,
        max_size=settings.postgres_pool_size,
        wait=settings.postgres_timeout,
        retry_after=settings.retry_after,
    )
    try:
        await ensure_topic(settings.kafka_bootstrap, settings.shards_topic, settings.shards_topic_partitions)
        relay = await OutboxRelay.connect(
            store,
            settings.kafka_bootstrap,
            settings.shards_topic,
            settings.outbox_batch_size,
            settings.shards_topic_partitions,
        )
    except BaseException:
        await store.close()
        raise
    objects = settings.object_store()
    results = ResultWriter(objects, settings.url_expiry)
    relaying = Periodic("outbox relay", relay.relay_batch, settings.poll_interval)
    planner = JobPlanner(store, objects, on_planned=relaying.wake)
    planning = Periodic("job planner", planner.plan_next, settings.poll_interval)
    reaper = LeaseReaper(
        store,
        results,
        settings.max_shard_attempts,
        on_requeued=relaying.wake,
        unclaimed_timeout=settings.unclaimed_shard_timeout,
    )
    reaping = Periodic("lease reaper", reaper.sweep, settings.lease_check_interval)
    limits = BatchLimits(settings.default_shard_size, settings.max_shard_size, settings.default_output_prefix)
    changes = JobChanges(settings.postgres_url, settings.retry_after)
    jobs = BatchJobs(
        store, results, limits, settings.watch_interval, changes=changes, on_created=planning.wake
    )
    counting = Periodic("job census", JobCensus(store).refresh, settings.census_interval)
    background = BackgroundWork([relaying, planning, reaping, counting, changes])
    try:
        server, port = create_server(
            "batch",
            settings,
            [ServiceBinding(pb_grpc.add_BatchServiceServicer_to_server, BatchServicer(jobs), SERVICE)],
        )
    except BaseException:
        await relay.close()
        await store.close()
        raise
    # Cleanups run last added first: loops stop, then the producer, then the pool.
    server.on_stop(store.close)
    server.on_stop(relay.close)
    server.on_stop(background.stop)
    background.start()
    return server, port
