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

from tensorway.batch.domain import (
    InputFormat,
    InputPlan,
    Job,
    JobDraft,
    JobSpec,
    ObjectRef,
    OutputFormat,
    Page,
    job_name,
)
from tensorway.batch.inputs import NPY_HEADER_PROBE_BYTES, InputError, plan_jsonl, plan_npy
from tensorway.batch.job_changes import JobChanges
from tensorway.batch.job_store import JobStore
from tensorway.batch.object_store import ObjectStore, StorageError
from tensorway.batch.parquet import plan_parquet
from tensorway.batch.results import PresignedObject, ResultWriter
from tensorway.batch.tenancy import TenantStorage
from tensorway.runtime import FieldViolation, InvalidArgument, PermissionDenied, TensorwayError, tracing

logger = logging.getLogger(__name__)
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Parquet column names are free text; these bounds only keep a job's record small.
MAX_COLUMN_NAME_CHARS = 256
MAX_INPUT_COLUMNS = 64
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
    """Shard sizes, priorities and upload sizes the API accepts."""

    default_shard_size: int
    max_shard_size: int
    min_priority: int = 0
    max_priority: int = 9
    max_upload_bytes: int = 5 * 1024**3
    upload_url_expiry: timedelta = timedelta(hours=1)


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


def validate(
    draft: JobDraft, limits: BatchLimits, storage: TenantStorage, tenant: str, job_id: str
) -> JobSpec:
    """The draft with defaults filled in, or INVALID_ARGUMENT naming every malformed field, or
    PERMISSION_DENIED naming an object outside the tenant's prefixes. Checks only: nothing is
    read or written."""
    violations: list[FieldViolation] = []
    if not MODEL_NAME.match(draft.model):
        violations.append(FieldViolation("job.model", "a model name: letters, digits, '_', '.', '-'"))
    input_format = draft.input_format
    refusals: list[TensorwayError] = []
    input_ref: ObjectRef | None = None
    output_ref: ObjectRef | None = None
    try:
        input_ref = storage.input(tenant, draft.input_uri)
    except (InvalidArgument, PermissionDenied) as exc:
        refusals.append(exc)
    if input_ref is not None:
        input_format = input_format or InputFormat.from_key(input_ref.key)
        if input_format is None:
            violations.append(
                FieldViolation("job.input_format", "name it, or end the key in .jsonl, .npy or .parquet")
            )
        elif input_ref.key.endswith("/") and input_format is not InputFormat.PARQUET:
            violations.append(
                FieldViolation("job.input_uri", "a prefix ending in '/' is a folder of Parquet files")
            )
    if input_format is not InputFormat.PARQUET and (draft.input_columns or draft.id_column):
        violations.append(FieldViolation("job.input_columns", "columns are named for Parquet inputs only"))
    if len(draft.input_columns) > MAX_INPUT_COLUMNS:
        violations.append(FieldViolation("job.input_columns", f"at most {MAX_INPUT_COLUMNS} inputs"))
    for name, column in (*draft.input_columns, ("", draft.id_column)):
        if len(name) > MAX_COLUMN_NAME_CHARS or len(column) > MAX_COLUMN_NAME_CHARS or (name and not column):
            violations.append(
                FieldViolation(
                    f"job.input_columns[{name!r}]" if name else "job.id_column",
                    f"a column name of 1 to {MAX_COLUMN_NAME_CHARS} characters",
                )
            )
    output_format = draft.output_format or (
        OutputFormat.PARQUET if input_format is InputFormat.PARQUET else OutputFormat.JSONL
    )
    try:
        output_ref = storage.output(tenant, job_id, draft.output_prefix)
    except (InvalidArgument, PermissionDenied) as exc:
        refusals.append(exc)
    shard_size = draft.shard_size or limits.default_shard_size
    if not 0 < shard_size <= limits.max_shard_size:
        violations.append(FieldViolation("job.shard_size", f"between 1 and {limits.max_shard_size}, or 0"))
    if not limits.min_priority <= draft.priority <= limits.max_priority:
        violations.append(
            FieldViolation("job.priority", f"between {limits.min_priority} and {limits.max_priority}")
        )
    # A malformed request is told so first; only a well-formed one learns what it may not touch.
    for refusal in refusals:
        if isinstance(refusal, InvalidArgument):
            violations.extend(refusal.violations)
    if violations:
        raise InvalidArgument("the job is not valid", violations)
    if refusals:
        raise refusals[0]
    assert input_ref is not None
    assert output_ref is not None
    assert input_format is not None
    return JobSpec(
        model=draft.model,
        model_version=draft.model_version,
        input_uri=input_ref.uri,
        input_format=input_format,
        output_prefix=output_ref.uri,
        shard_size=shard_size,
        priority=draft.priority,
        output_format=output_format,
        input_columns=draft.input_columns,
        id_column=draft.id_column,
    )


@dataclass(frozen=True)
class Upload:
    """A reserved input object and the presigned URL its bytes go to."""

    ref: ObjectRef
    url: str
    expire_time: datetime


class BatchJobs:
    """Create, read, list, cancel and watch a tenant's jobs."""

    def __init__(
        self,
        store: JobStore,
        results: ResultWriter,
        limits: BatchLimits,
        watch_interval: timedelta,
        *,
        storage: TenantStorage,
        objects: ObjectStore,
        changes: JobChanges,
        on_created: Callable[[], None],
    ) -> None:
        self._store = store
        self._results = results
        self._limits = limits
        self._storage = storage
        self._objects = objects
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
        spec = validate(draft, self._limits, self._storage, tenant, job_id)
        job = await self._store.create_job(job_id, tenant, request_id, spec, dict(tracing.inject()))
        self._on_created()
        return self._status(job)

    def create_upload(self, tenant: str, file_name: str, size_bytes: int) -> Upload:
        """A fresh object under the tenant's uploads prefix and a presigned PUT URL for it.
        Nothing is stored until the caller uploads; an upload never used is just an object."""
        violations = []
        if not file_name:
            violations.append(FieldViolation("file_name", "the file's name, e.g. rows.jsonl"))
        if not 0 <= size_bytes <= self._limits.max_upload_bytes:
            violations.append(
                FieldViolation("size_bytes", f"between 0 and {self._limits.max_upload_bytes} bytes")
            )
        if violations:
            raise InvalidArgument("the upload is not valid", violations)
        ref = self._storage.new_upload(tenant, file_name)
        expiry = self._limits.upload_url_expiry
        url = self._objects.presign_upload(ref, expiry)
        return Upload(ref, url, datetime.now(UTC) + expiry)

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

    def __init__(
        self,
        store: JobStore,
        objects: ObjectStore,
        on_planned: Callable[[], None],
        storage: TenantStorage,
    ) -> None:
        self._store = store
        self._objects = objects
        self._on_planned = on_planned
        self._storage = storage

    async def _plan(self, job: Job) -> InputPlan:
        # Checked again here: a job recorded before the rules (or by another writer) must not
        # read or write outside its tenant's prefixes either.
        ref = self._storage.input(job.tenant, job.spec.input_uri, "input_uri")
        self._storage.output(job.tenant, job.id, job.spec.output_prefix, "output_prefix")
        if job.spec.input_format is InputFormat.JSONL:
            return await self._objects.scan(ref, lambda chunks: plan_jsonl(chunks, job.spec.shard_size))
        if job.spec.input_format is InputFormat.PARQUET:
            return await plan_parquet(self._objects, ref, job.spec.shard_size)
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
            except TensorwayError as exc:
                await self._store.fail_planning(connection, job, f"the job cannot run: {exc.message}")
                logger.info("job failed: refused", extra={"job": job.name, "reason": exc.message})
                return True
            except Exception:
                # Whatever else a job's input does to the planner, it ends that job only: retried,
                # it would stall every job queued behind it.
                logger.exception("job failed: planning raised", extra={"job": job.name})
                await self._store.fail_planning(
                    connection, job, "the job's input could not be planned; the server logged the details"
                )
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
            try:
                await self._results.finalize(self._store, job_id)
            except Exception:
                # One job's manifest that cannot be written must not keep the others from ending.
                logger.exception("job not finalized; trying again", extra={"job": job_name(job_id)})
        return False
