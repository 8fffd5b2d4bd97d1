"""The batch API: its settings, the thin gRPC servicer, and `create`, which `tensorway serve
batch` runs. The process also plans queued jobs into shards, relays the outbox to Kafka and
re-queues the shards of dead workers; several replicas share that work through row locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, Protocol

from pydantic import Field, PositiveInt
from pydantic_settings import SettingsConfigDict

from tensorway.batch import converters
from tensorway.batch.core import BatchJobs, BatchLimits, JobPlanner, LeaseReaper, Periodic
from tensorway.batch.domain import job_id_of
from tensorway.batch.job_changes import JobChanges
from tensorway.batch.job_store import JobStore
from tensorway.batch.metrics import JobCensus
from tensorway.batch.object_store import StorageError
from tensorway.batch.outbox import OutboxRelay, ensure_topic
from tensorway.batch.results import ResultWriter
from tensorway.batch.settings import BatchSettings
from tensorway.batch.tenancy import TenantStorage
from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tensorway.runtime import (
    FieldViolation,
    InvalidArgument,
    ServiceBinding,
    ServiceServer,
    create_server,
)
from tensorway.runtime.context import Scope, require_scope
from tensorway.runtime.requests import refuse_nul

SERVICE = pb.DESCRIPTOR.services_by_name["BatchService"]
logger = logging.getLogger(__name__)


class Settings(BatchSettings):
    """The batch API's settings, from TENSORWAY_BATCH_* variables."""

    model_config = SettingsConfigDict(env_prefix="TENSORWAY_BATCH_", extra="ignore")

    default_shard_size: int = 10_000
    """Rows per shard when a job does not say."""
    max_shard_size: int = 1_000_000
    """The most rows per shard a job may ask for."""
    uploads_uri: str = "s3://tensorway-batch/uploads/{tenant}/"
    """Each tenant's own prefix, {tenant} its id: CreateUpload puts files here, and a job's input
    must lie here (or under one of the tenant's extra_input_prefixes). The service makes the bucket."""
    results_uri: str = "s3://tensorway-batch/results/{tenant}/{job}/"
    """Where a job's results always go, {tenant} and {job} its tenant's and its own id. The
    service makes the bucket."""
    extra_input_prefixes: dict[str, list[str]] = Field(default_factory=dict)
    """Further prefixes a tenant's jobs may read, tenant → ["s3://bucket/prefix/", ...]
    (JSON in the environment): data a tenant keeps elsewhere, never another tenant's."""
    min_priority: int = 0
    """The lowest priority a job may have."""
    max_priority: int = 9
    """The highest priority a job may have; priorities order a tenant's own jobs only."""
    max_upload_bytes: int = 5 * 1024**3
    """The largest file CreateUpload accepts: one presigned PUT, whose S3 limit is 5 GiB."""
    upload_url_expiry: timedelta = timedelta(hours=1)
    """How long a presigned upload URL works."""
    shards_in_flight: int = 128
    """Most shards published to the workers and not yet finished; the rest wait in the outbox,
    from which each tenant's next shard is taken in turn. More keeps more workers busy; fewer
    lets a tenant's new job overtake another's backlog sooner."""
    tenant_shares: dict[str, PositiveInt] = Field(default_factory=dict)
    """Each tenant's share of the shards in flight, tenant → share (JSON in the environment,
    e.g. {"acme": 3, "beta": 1}); a tenant not named has share 1. With backlogs waiting, a
    tenant of share 3 has three shards in flight to each one of a tenant of share 1."""
    watch_interval: timedelta = timedelta(milliseconds=500)
    """How often WatchJob looks at a job's progress when PostgreSQL has not told it of a change."""
    poll_interval: timedelta = timedelta(seconds=1)
    """How often the planner and the outbox relay look for work that other replicas left."""
    outbox_batch_size: int = 500
    """Outbox messages published per transaction."""
    lease_check_interval: timedelta = timedelta(seconds=1)
    """How often expired shard leases are looked for; with the workers' lease timeout, this
    bounds how long a dead worker's shard waits."""
    unclaimed_shard_timeout: timedelta = timedelta(seconds=3)
    """A pending shard offered to the workers this long ago that none has taken is published
    again: its message was lost (a broker restarted without its data). A shard that only waits
    in a backlog longer than this is published again too, once every this long, which costs a
    message and a look-up (a shard is leased and counted once); see docs/reliability.md."""
    max_shard_attempts: int = 5
    """Leases a shard gets before it fails with all its rows."""
    census_interval: timedelta = timedelta(seconds=10)
    """How often the jobs-by-state and shards-left gauges are counted from PostgreSQL."""


def _tenant() -> str:
    """The caller's tenant, once its token is known to allow batch calls."""
    return require_scope(Scope.BATCH).tenant


def _job_id(name: str, field: str = "name") -> str:
    job_id = job_id_of(name)
    if job_id is None:
        raise InvalidArgument(f"{field} must be jobs/{{job}}", [FieldViolation(field, "jobs/{job}")])
    return job_id


class BatchServicer(pb_grpc.BatchServiceServicer):
    """BatchService over gRPC: each method converts, calls the core and converts back."""

    def __init__(self, jobs: BatchJobs) -> None:
        self._jobs = jobs

    async def CreateJob(self, request: pb.CreateJobRequest, context: Any) -> pb.CreateJobResponse:
        tenant = _tenant()
        refuse_nul(request)
        draft = converters.draft_from_proto(request.job)
        status = await self._jobs.create(tenant, request.request_id, draft)
        return pb.CreateJobResponse(job=converters.job_to_proto(status))

    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.GetJobResponse:
        tenant = _tenant()
        status = await self._jobs.get(tenant, _job_id(request.name))
        return pb.GetJobResponse(job=converters.job_to_proto(status))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        tenant = _tenant()
        refuse_nul(request)
        jobs, token = await self._jobs.list(tenant, request.filter, request.page_size, request.page_token)
        return pb.ListJobsResponse(jobs=[converters.job_to_proto(j) for j in jobs], next_page_token=token)

    async def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.CancelJobResponse:
        tenant = _tenant()
        status = await self._jobs.cancel(tenant, _job_id(request.name))
        return pb.CancelJobResponse(job=converters.job_to_proto(status))

    async def WatchJob(self, request: pb.WatchJobRequest, context: Any) -> AsyncIterator[pb.WatchJobResponse]:
        tenant = _tenant()
        async for status in self._jobs.watch(tenant, _job_id(request.name)):
            yield pb.WatchJobResponse(job=converters.job_to_proto(status))

    async def CreateUpload(self, request: pb.CreateUploadRequest, context: Any) -> pb.CreateUploadResponse:
        tenant = _tenant()
        refuse_nul(request)
        upload = self._jobs.create_upload(tenant, request.file_name, request.size_bytes)
        return converters.upload_to_proto(upload)


class BackgroundLoop(Protocol):
    """Work that runs until cancelled."""

    @property
    def name(self) -> str: ...

    async def run(self) -> None: ...


class BackgroundWork:
    """The API process's loops, in one task group from `start` until `stop`."""

    def __init__(self, loops: list[BackgroundLoop]) -> None:
        self._loops = loops
        self._running: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for loop in self._loops:
                group.create_task(loop.run(), name=loop.name)

    def start(self) -> None:
        # A task of its own owns the group, so the loops outlive `create` and stop together,
        # each cancelled and awaited, when `stop` cancels it.
        self._running = asyncio.create_task(self._run(), name="batch background work")

    async def stop(self) -> None:
        """Cancel the loops and wait until they ended; safe to call twice."""
        running, self._running = self._running, None
        if running is not None:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


async def create(settings: Settings) -> tuple[ServiceServer, int]:
    """The batch API server, not yet started, and its port. Its background loops run from here
    until the server stops."""
    async with contextlib.AsyncExitStack() as stack:
        store = await JobStore.for_service(settings)
        stack.push_async_callback(store.close)
        await ensure_topic(settings.kafka_bootstrap, settings.shards_topic, settings.shards_topic_partitions)
        relay = await OutboxRelay.connect(
            store,
            settings.kafka_bootstrap,
            settings.shards_topic,
            settings.outbox_batch_size,
            settings.shards_topic_partitions,
            in_flight=settings.shards_in_flight,
            shares=settings.tenant_shares,
        )
        stack.push_async_callback(relay.close)
        objects = settings.object_store()
        storage = TenantStorage(settings.uploads_uri, settings.results_uri, settings.extra_input_prefixes)
        for bucket in sorted(storage.buckets):
            try:
                await objects.ensure_bucket(bucket)
            except StorageError as exc:
                # S3 down at start must not keep the API down: jobs wait, and their writes fail visibly.
                logger.warning("cannot make the batch bucket", extra={"bucket": bucket, "error": str(exc)})
        results = ResultWriter(objects, settings.url_expiry)
        relaying = Periodic("outbox relay", relay.relay_batch, settings.poll_interval)
        planner = JobPlanner(store, objects, on_planned=relaying.wake, storage=storage)
        planning = Periodic("job planner", planner.plan_next, settings.poll_interval)
        reaper = LeaseReaper(
            store,
            results,
            settings.max_shard_attempts,
            on_requeued=relaying.wake,
            unclaimed_timeout=settings.unclaimed_shard_timeout,
        )
        reaping = Periodic("lease reaper", reaper.sweep, settings.lease_check_interval)
        limits = BatchLimits(
            default_shard_size=settings.default_shard_size,
            max_shard_size=settings.max_shard_size,
            min_priority=settings.min_priority,
            max_priority=settings.max_priority,
            max_upload_bytes=settings.max_upload_bytes,
            upload_url_expiry=settings.upload_url_expiry,
        )

        def made_room() -> None:
            # A change of a job (a shard finished) may make room for shards that wait in the outbox.
            if relay.backlogged:
                relaying.wake()

        changes = JobChanges(store.database, settings.retry_after, on_any_change=made_room)
        jobs = BatchJobs(
            store,
            results,
            limits,
            settings.watch_interval,
            storage=storage,
            objects=objects,
            changes=changes,
            on_created=planning.wake,
        )
        server, port = create_server(
            "batch",
            settings,
            [ServiceBinding(pb_grpc.add_BatchServiceServicer_to_server, BatchServicer(jobs), SERVICE)],
        )
        counting = Periodic("job census", JobCensus(store).refresh, settings.census_interval)
        background = BackgroundWork([relaying, planning, reaping, counting, changes])
        background.start()
        # Cleanups run last added first: loops stop, then the producer, then the pool.
        stack.push_async_callback(background.stop)
        cleanups = stack.pop_all()
    server.on_stop(cleanups.aclose)
    return server, port
