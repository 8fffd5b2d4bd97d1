"""The batch API's logic on typed values, and the background work of the API process: planning
queued jobs into shards and re-queuing the shards of dead workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tensorway.batch.domain import InputFormat, InputPlan, Job, JobDraft, JobSpec, ObjectRef, Page
from tensorway.batch.inputs import NPY_HEADER_PROBE_BYTES, InputError, plan_jsonl, plan_npy
from tensorway.batch.results import PresignedObject, ResultWriter
from tensorway.batch.storage import ObjectStore, StorageError
from tensorway.batch.store import JobChanges, JobStore
from tensorway.runtime import FieldViolation, InvalidArgument, tracing

logger = logging.getLogger(__name__)
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# How far back WatchJob looks to say how fast rows are going now.
RATE_WINDOW = timedelta(seconds=10)


@dataclass(frozen=True)
class JobStatus:
    """A job as callers see it: with its rate, ETA and presigned URLs."""

    job: Job
    rows_per_second: float
    eta: timedelta | None
    manifest: PresignedObject | None
    results: tuple[PresignedObject, ...]
    errors: PresignedObject | None


@dataclass(frozen=True)
class BatchLimits:
    """Shard sizes the API accepts, and the output prefix it picks when the caller gives none."""

    default_shard_size: int
    max_shard_size: int
    default_output_prefix: str


def _eta(job: Job, rate: float) -> timedelta | None:
    remaining = job.progress.rows_total - job.progress.rows_finished
    if job.state.final or rate <= 0 or remaining <= 0:
        return None
    return timedelta(seconds=remaining / rate)


def average_rate(job: Job, now: datetime) -> float:
    """Rows per second since the job started (until it ended)."""
    if job.start_time is None:
        return 0.0
    seconds = ((job.end_time or now) - job.start_time).total_seconds()
    return job.progress.rows_finished / seconds if seconds > 0 else 0.0


def validate(draft: JobDraft, limits: BatchLimits, job_id: str) -> JobSpec:
    """The draft with defaults filled in, or INVALID_ARGUMENT naming every bad field."""
    violations: list[FieldViolation] = []
    if not MODEL_NAME.match(draft.model):
        violations.append(FieldViolation("job.model", "a model name: letters, digits, '_', '.', '-'"))
    input_format = draft.input_format
    try:
        input_ref = ObjectRef.parse(draft.input_uri)
        if not input_ref.key:
            raise ValueError("no key")
        input_format = input_format or InputFormat.from_key(input_ref.key)
        if input_format is None:
            violations.append(FieldViolation("job.input_format", "name it, or end the key in .jsonl or .npy"))
    except ValueError:
        violations.append(FieldViolation("job.input_uri", "an object URI, s3://bucket/key"))
    output_prefix = draft.output_prefix or limits.default_output_prefix.format(job=job_id)
    try:
        ObjectRef.parse(output_prefix)
    except ValueError:
        violations.append(FieldViolation("job.output_prefix", "a prefix URI, s3://bucket/prefix/"))
    if not output_prefix.endswith("/"):
        output_prefix += "/"
    shard_size = draft.shard_size or limits.default_shard_size
    if not 0 < shard_size <= limits.max_shard_size:
        violations.append(FieldViolation("job.shard_size", f"between 1 and {limits.max_shard_size}, or 0"))
    if violations or input_format is None:
        raise InvalidArgument("the job is not valid", violations)
    return JobSpec(
        model=draft.model,
        model_version=draft.model_version,
        input_uri=draft.input_uri,
        input_format=input_format,
        output_prefix=output_prefix,
        shard_size=shard_size,
        priority=draft.priority,
    )


class BatchJobs:
    """Create, read, list, cancel and watch a tenant's jobs."""

    def __init__(
        self,
        store: JobStore,
        results: ResultWriter,
        limits: BatchLimits,
        watch_interval: timedelta,
        *,
        changes: JobChanges,
        on_created: Callable[[], None],
    ) -> None:
        self._store = store
        self._results = results
        self._limits = limits
        self._watch_interval = watch_interval
        self._changes = changes
        self._on_created = on_created

    def _status(self, job: Job, rate: float | None = None) -> JobStatus:
        rate = average_rate(job, datetime.now(UTC)) if rate is None else rate
        return JobStatus(
            job=job,
            rows_per_second=rate,
            eta=_eta(job, rate),
            manifest=self._results.presign(job.manifest) if job.manifest else None,
            results=tuple(self._results.presign(r) for r in job.results) if job.state.final else (),
            errors=self._results.presign(job.errors) if job.errors else None,
        )

    async def create(self, tenant: str, request_id: str, draft: JobDraft) -> JobStatus:
        """Record a job; the planner divides it into shards. A repeated request_id gives the first job."""
        job_id = uuid.uuid4().hex
        spec = validate(draft, self._limits, job_id)
        job = await self._store.create_job(job_id, tenant, request_id, spec, dict(tracing.inject()))
        self._on_created()
        return self._status(job)

    async def get(self, tenant: str, job_id: str) -> JobStatus:
        return self._status(await self._store.get_job(tenant, job_id))

    async def list(
        self, tenant: str, filter_text: str, page_size: int, page_token: str
    ) -> tuple[list[JobStatus], str]:
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative", [FieldViolation("page_size", ">= 0")])
        page: Page = await self._store.list_jobs(tenant, filter_text, page_size, page_token)
        return [self._status(job) for job in page.jobs], page.next_page_token

    async def cancel(self, tenant: str, job_id: str) -> JobStatus:
        """Cancel the job: no shard not yet finished will be. A job that has ended stays as it is."""
        return self._status(await self._store.cancel_job(tenant, job_id))

    async def watch(self, tenant: str, job_id: str) -> AsyncIterator[JobStatus]:
        """The job now, then each time its progress or state changes, until it ends."""
        with self._changes.watching(job_id) as changed:
            async for status in self._watch(tenant, job_id, changed):
                yield status

    async def _watch(self, tenant: str, job_id: str, changed: asyncio.Event) -> AsyncIterator[JobStatus]:
        samples: deque[tuple[float, int]] = deque()
        last: tuple[object, ...] | None = None
        while True:
            # Cleared before the look, so a change after it wakes the next one.
            changed.clear()
            job = await self._store.get_job(tenant, job_id)
            now = time.monotonic()
            samples.append((now, job.progress.rows_finished))
            while now - samples[0][0] > RATE_WINDOW.total_seconds():
                samples.popleft()
            span = now - samples[0][0]
            rate = (
                (samples[-1][1] - samples[0][1]) / span if span > 0 else average_rate(job, datetime.now(UTC))
            )
            seen = (job.state, job.progress)
            if seen != last:
                last = seen
                yield self._status(job, None if job.state.final else rate)
            if job.state.final:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self._watch_interval.total_seconds())


class Periodic:
    """Runs `step` when woken and at least every `interval`, until cancelled. `step` returns
    True when more work is waiting, to run again at once; a failing step is logged and retried."""

    def __init__(self, name: str, step: Callable[[], Awaitable[bool]], interval: timedelta) -> None:
        self.name = name
        self._step = step
        self._interval = interval
        self._woken = asyncio.Event()

    def wake(self) -> None:
        self._woken.set()

    async def run(self) -> None:
        while True:
            self._woken.clear()
            try:
                more = await self._step()
            except Exception:
                logger.exception("%s failed; retrying", self.name)
                more = False
            if not more:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), self._interval.total_seconds())


class JobPlanner:
    """Reads queued jobs' inputs and divides them into shards, recorded with their outbox
    messages in one transaction. An unusable input fails the job with the reason."""

    def __init__(self, store: JobStore, objects: ObjectStore, on_planned: Callable[[], None]) -> None:
        self._store = store
        self._objects = objects
        self._on_planned = on_planned

    async def _plan(self, job: Job) -> InputPlan:
        ref = ObjectRef.parse(job.spec.input_uri)
        if job.spec.input_format is InputFormat.JSONL:
            return await self._objects.scan(ref, lambda chunks: plan_jsonl(chunks, job.spec.shard_size))
        size = await self._objects.size(ref)
        head = await self._objects.read(ref, 0, min(size, NPY_HEADER_PROBE_BYTES)) if size else b""
        return plan_npy(head, size, job.spec.shard_size)

    async def plan_next(self) -> bool:
        """Plan the most urgent unplanned job; False when there was none."""
        async with self._store.job_to_plan() as claimed:
            if claimed is None:
                return False
            connection, job = claimed
            try:
                plan = await self._plan(job)
                if plan.rows_total == 0:
                    raise InputError("has no rows")
            except StorageError as exc:
                await self._store.fail_planning(connection, job, f"cannot read the input: {exc}")
                logger.info("job failed: input unreadable", extra={"job": job.name, "reason": str(exc)})
                return True
            except InputError as exc:
                await self._store.fail_planning(connection, job, f"the input {job.spec.input_uri} {exc}")
                logger.info("job failed: input unusable", extra={"job": job.name, "reason": str(exc)})
                return True
            await self._store.record_plan(connection, job, plan)
        logger.info(
            "job planned", extra={"job": job.name, "rows": plan.rows_total, "shards": len(plan.shards)}
        )
        self._on_planned()
        return True


class LeaseReaper:
    """Hands out again the shards of workers that died (their lease ran out) and the shards whose
    message the broker lost (offered long ago, never leased), and finishes jobs whose last
    shard's worker died before it could."""

    def __init__(
        self,
        store: JobStore,
        results: ResultWriter,
        max_attempts: int,
        on_requeued: Callable[[], None],
        unclaimed_timeout: timedelta,
    ) -> None:
        self._store = store
        self._results = results
        self._max_attempts = max_attempts
        self._on_requeued = on_requeued
        self._unclaimed_timeout = unclaimed_timeout

    async def sweep(self) -> bool:
        requeued, failed = await self._store.requeue_expired(self._max_attempts)
        if requeued or failed:
            logger.info("expired shard leases", extra={"requeued": requeued, "failed": failed})
        republished = await self._store.republish_unclaimed(self._unclaimed_timeout)
        if republished:
            logger.warning("shards nobody took were published again", extra={"shards": republished})
        if requeued or republished:
            self._on_requeued()
        for job_id in await self._store.jobs_to_finalize():
            await self._results.finalize(self._store, job_id)
        return False
