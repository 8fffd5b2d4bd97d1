"""PostgreSQL, the truth of batch jobs: jobs, their shards, and the outbox of shard messages.

Every state change is one transaction, and a change that must reach Kafka (a shard to run)
writes its outbox row in the same transaction, so the database and the topic never disagree.
Shard completion is guarded by the shard's state, so a redelivered or re-leased shard is
counted once however many workers finish it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, LiteralString

from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from tensorway.batch.domain import (
    InputPlan,
    Job,
    JobSpec,
    JobState,
    Page,
    ShardLease,
    ShardOutcome,
    ShardPlan,
    StoredObject,
    job_name,
)
from tensorway.batch.job_rows import JOB_QUERY, job_from_row, npy_layout_from_row, shard_from_row
from tensorway.batch.migrations import SCHEMA
from tensorway.batch.settings import BatchSettings
from tensorway.batch.shard_messages import INSERT_OUTBOX, OutboxBatch, OutboxMessage, shard_message
from tensorway.runtime import FieldViolation, InvalidArgument, NotFound
from tensorway.runtime.postgres import Connection, Database, PageCursor, parse_filter_terms

# The error of a shard its worker gave back as it stopped (`JobStore.give_back`).
GIVEN_BACK = "the worker stopped before the shard was done"

MAX_PAGE_SIZE = 500
LIST_FILTER_FIELDS = {"state", "model"}

# The rest of the planner's query after JOB_QUERY: each tenant's jobs in its own priority order,
# and the tenants in turn. A job's place is its rank among its tenant's waiting jobs plus the
# jobs that tenant already has running, so a thousand queued jobs of one tenant do not hold up
# another's first.
NEXT_JOB_TO_PLAN: LiteralString = """ JOIN (
                    SELECT q.id, q.rank + coalesce(a.n, 0) AS turn FROM (
                        SELECT id, tenant, row_number() OVER (
                            PARTITION BY tenant ORDER BY priority DESC, seq) AS rank
                        FROM batch_jobs WHERE state = 'QUEUED' AND NOT planned) q
                    LEFT JOIN (
                        SELECT tenant, count(*) AS n FROM batch_jobs
                        WHERE state IN ('QUEUED', 'RUNNING') AND planned GROUP BY tenant) a
                    ON a.tenant = q.tenant) t ON t.id = j.id
                WHERE j.state = 'QUEUED' AND NOT j.planned
                ORDER BY t.turn, j.seq LIMIT 1 FOR UPDATE OF j SKIP LOCKED"""


def parse_job_filter(text: str) -> dict[str, str]:
    """`state=RUNNING AND model=digits` → {"state": "RUNNING", "model": "digits"}."""
    terms: dict[str, str] = {}
    for field, value in parse_filter_terms(text):
        if field not in LIST_FILTER_FIELDS or not value:
            raise InvalidArgument(
                f"cannot filter on {field}={value!r}",
                [FieldViolation("filter", "terms are state=STATE or model=NAME, joined by ' AND '")],
            )
        if field == "state" and value.removeprefix("JOB_STATE_") not in JobState.__members__:
            raise InvalidArgument(
                f"unknown state {value!r}", [FieldViolation("filter", f"states: {', '.join(JobState)}")]
            )
        terms[field] = value.removeprefix("JOB_STATE_") if field == "state" else value
    return terms


@dataclass(frozen=True)
class ShardRecord:
    """A shard as finalization needs it: how it ended and what it wrote."""

    plan: ShardPlan
    state: str
    last_error: str
    result: StoredObject | None
    errors: StoredObject | None


@dataclass(frozen=True)
class Completion:
    """What marking a shard done did: whether this call counted it, and whether that was the
    job's last unfinished shard."""

    recorded: bool
    job_finished: bool


# Shards each tenant has in flight: open (pending or leased) and no longer waiting in the outbox.
IN_FLIGHT_QUERY: LiteralString = """WITH open AS (
        SELECT j.tenant, count(*) AS n FROM batch_shards s JOIN batch_jobs j ON j.id = s.job_id
        WHERE s.state IN ('PENDING', 'LEASED') GROUP BY j.tenant),
    waiting AS (SELECT tenant, count(*) AS n FROM batch_outbox GROUP BY tenant)
    SELECT coalesce(o.tenant, w.tenant) AS tenant,
        greatest(coalesce(o.n, 0) - coalesce(w.n, 0), 0) AS flying, coalesce(w.n, 0) AS waiting
    FROM open o FULL JOIN waiting w ON w.tenant = o.tenant"""


class JobStore:
    """The batch tables, over a connection pool. PostgreSQL down gives UNAVAILABLE."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @classmethod
    async def open(cls, url: str, *, max_size: int, wait: timedelta, retry_after: timedelta) -> JobStore:
        """Connect and bring the schema up to date (safe from several processes at once)."""
        database = await Database.open(
            url, SCHEMA, size=max_size, wait=wait, retry_after=retry_after, what="the batch database"
        )
        return cls(database)

    @classmethod
    async def for_service(cls, settings: BatchSettings) -> JobStore:
        """The store the batch API and each worker open, as their settings say."""
        return await cls.open(
            settings.postgres_url,
            max_size=settings.postgres_pool_size,
            wait=settings.postgres_timeout,
            retry_after=settings.retry_after,
        )

    async def close(self) -> None:
        await self.database.close()

    async def _fetch_job(self, connection: Connection, job_id: str, tenant: str | None = None) -> Job | None:
        if tenant is None:
            cursor = await connection.execute(JOB_QUERY + " WHERE j.id = %s", (job_id,))
        else:
            cursor = await connection.execute(
                JOB_QUERY + " WHERE j.id = %s AND j.tenant = %s", (job_id, tenant)
            )
        row = await cursor.fetchone()
        return job_from_row(row) if row else None

    # --- the API's side -------------------------------------------------------------------

    async def create_job(
        self, job_id: str, tenant: str, request_id: str, spec: JobSpec, trace_context: Mapping[str, str]
    ) -> Job:
        """Record a queued job; with a request_id seen before for this tenant, the first job."""
        async with self.database.transaction() as connection:
            cursor = await connection.execute(
                """INSERT INTO batch_jobs (id, tenant, request_id, model, model_version, input_uri,
                    input_format, output_prefix, shard_size, priority, state, trace_context,
                    output_format, input_columns, id_column)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'QUEUED', %s, %s, %s, %s)
                ON CONFLICT (tenant, request_id) DO NOTHING RETURNING id""",
                (
                    job_id,
                    tenant,
                    request_id or None,
                    spec.model,
                    spec.model_version,
                    spec.input_uri,
                    spec.input_format.value,
                    spec.output_prefix,
                    spec.shard_size,
                    spec.priority,
                    Jsonb(dict(trace_context)),
                    spec.output_format.value,
                    Jsonb(dict(spec.input_columns)),
                    spec.id_column,
                ),
            )
            if await cursor.fetchone() is None:
                cursor = await connection.execute(
                    "SELECT id FROM batch_jobs WHERE tenant = %s AND request_id = %s", (tenant, request_id)
                )
                existing = await cursor.fetchone()
                assert existing is not None  # the conflicting row exists: jobs are never deleted
                job_id = existing["id"]
            job = await self._fetch_job(connection, job_id)
        assert job is not None
        return job

    async def get_job(self, tenant: str, job_id: str) -> Job:
        """The tenant's job; NOT_FOUND for another tenant's, so ids reveal nothing."""
        async with self.database.transaction() as connection:
            job = await self._fetch_job(connection, job_id, tenant)
        if job is None:
            raise NotFound("job", job_name(job_id))
        return job

    async def job(self, job_id: str) -> Job | None:
        async with self.database.transaction() as connection:
            return await self._fetch_job(connection, job_id)

    async def list_jobs(self, tenant: str, filter_text: str, page_size: int, page_token: str) -> Page:
        """The tenant's jobs, newest first."""
        terms = parse_job_filter(filter_text)
        cursor = PageCursor(
            page_size,
            page_token,
            json.dumps(["jobs", tenant, sorted(terms.items())]),
            int,
            max_page_size=MAX_PAGE_SIZE,
        )
        params: dict[str, Any] = {
            "tenant": tenant,
            "state": terms.get("state"),
            "model": terms.get("model"),
            "before": cursor.after,
            "limit": cursor.limit + 1,
        }
        async with self.database.transaction() as connection:
            cursor_rows = await connection.execute(
                JOB_QUERY
                + """ WHERE j.tenant = %(tenant)s
                  AND (%(state)s::text IS NULL OR j.state = %(state)s)
                  AND (%(model)s::text IS NULL OR j.model = %(model)s)
                  AND (%(before)s::bigint IS NULL OR j.seq < %(before)s)
                ORDER BY j.seq DESC LIMIT %(limit)s""",
                params,
            )
            rows = await cursor_rows.fetchall()
        page, token = cursor.page(rows, "seq")
        return Page(jobs=tuple(job_from_row(r) for r in page), next_page_token=token)

    async def cancel_job(self, tenant: str, job_id: str) -> Job:
        """Cancel the job and every shard not yet finished; a cancelled job stays so."""
        async with self.database.transaction() as connection:
            cursor = await connection.execute(
                """UPDATE batch_jobs SET state = 'CANCELLED', end_time = now()
                WHERE id = %s AND tenant = %s AND state IN ('QUEUED', 'RUNNING') RETURNING id""",
                (job_id, tenant),
            )
            if await cursor.fetchone() is not None:
                await _drop_unfinished_shards(connection, job_id)
            job = await self._fetch_job(connection, job_id, tenant)
        if job is None:
            raise NotFound("job", job_name(job_id))
        return job

    # --- planning -------------------------------------------------------------------------

    @asynccontextmanager
    async def job_to_plan(self) -> AsyncIterator[tuple[Connection, Job] | None]:
        """The most urgent job not yet divided into shards, locked against other planners
        until the block ends; None when there is none."""
        async with self.database.transaction() as connection:
            cursor = await connection.execute(JOB_QUERY + NEXT_JOB_TO_PLAN)
            row = await cursor.fetchone()
            yield (connection, job_from_row(row)) if row else None

    async def record_plan(self, connection: Connection, job: Job, plan: InputPlan) -> None:
        """Within `job_to_plan`: store the shards and their outbox messages."""
        layout = plan.npy
        await connection.execute(
            """UPDATE batch_jobs SET planned = true, rows_total = %s, shards_total = %s, npy_layout = %s
            WHERE id = %s""",
            (
                plan.rows_total,
                len(plan.shards),
                Jsonb({"dtype": layout.dtype, "row_shape": list(layout.row_shape)}) if layout else None,
                job.id,
            ),
        )
        async with connection.cursor() as cursor:
            await cursor.executemany(
                """INSERT INTO batch_shards (job_id, shard, row_start, row_count, byte_start, byte_end,
                    source, source_row, state)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'PENDING')""",
                [
                    (
                        job.id,
                        s.index,
                        s.row_start,
                        s.row_count,
                        s.byte_start,
                        s.byte_end,
                        s.source,
                        s.source_row,
                    )
                    for s in plan.shards
                ],
            )
            await cursor.executemany(
                INSERT_OUTBOX,
                [
                    shard_message(job.id, s.index, job.tenant, job.trace_context, job.spec.priority)
                    for s in plan.shards
                ],
            )

    async def fail_planning(self, connection: Connection, job: Job, reason: str) -> None:
        """Within `job_to_plan`: the job cannot run; it ends FAILED with `reason`."""
        await _fail(connection, job.id, reason)

    async def fail_job(self, job_id: str, reason: str) -> bool:
        """End an active job as FAILED with `reason`; False when it had already ended."""
        async with self.database.transaction() as connection:
            return await _fail(connection, job_id, reason)

    # --- the outbox -----------------------------------------------------------------------

    @asynccontextmanager
    async def outbox_batch(
        self, limit: int, in_flight: int | None = None, shares: Mapping[str, int] | None = None
    ) -> AsyncIterator[OutboxBatch]:
        """Up to `limit` waiting messages, locked; they are deleted when the block ends without an
        error, and stay for the next try when it raises.

        With `in_flight`, only as many as keep the shards published and not yet finished within
        it, so the backlog waits here, where it can be reordered, rather than in the topic. The
        tenants take turns, weighted by their `shares` (1 for a tenant not named): a message's
        turn is its rank among its tenant's waiting messages (most urgent job first, then the
        oldest) plus the shards that tenant has in flight, divided by the tenant's share. So a
        tenant's single shard goes out next to another's thousand, not after them, and a tenant
        of share 3 has three shards in flight to every one of a tenant of share 1."""
        async with self.database.transaction() as connection:
            cursor = await connection.execute(IN_FLIGHT_QUERY)
            counts = await cursor.fetchall()
            flying = {r["tenant"]: int(r["flying"]) for r in counts}
            waiting = sum(int(r["waiting"]) for r in counts)
            if in_flight is not None:
                limit = min(limit, in_flight - sum(flying.values()))
            shares = shares or {}
            rows: list[DictRow] = []
            if limit > 0:
                cursor = await connection.execute(
                    """SELECT o.id, o.key, o.value, o.headers FROM batch_outbox o
                    JOIN (SELECT id, row_number() OVER (
                            PARTITION BY tenant ORDER BY priority DESC, id) AS rank
                        FROM batch_outbox) r ON r.id = o.id
                    LEFT JOIN unnest(%s::text[], %s::bigint[]) AS f(tenant, n) ON f.tenant = o.tenant
                    LEFT JOIN unnest(%s::text[], %s::float8[]) AS w(tenant, share) ON w.tenant = o.tenant
                    ORDER BY (r.rank + coalesce(f.n, 0)) / coalesce(w.share, 1), o.id
                    LIMIT %s FOR UPDATE OF o SKIP LOCKED""",
                    (list(flying), list(flying.values()), list(shares), list(shares.values()), limit),
                )
                rows = await cursor.fetchall()
            messages = [
                OutboxMessage(r["id"], bytes(r["key"]), bytes(r["value"]), r["headers"]) for r in rows
            ]
            yield OutboxBatch(messages, max(0, waiting - len(messages)))
            if messages:
                await connection.execute(
                    "DELETE FROM batch_outbox WHERE id = ANY(%s)", ([m.id for m in messages],)
                )
                shards = [m.key.decode().rpartition("/") for m in messages]
                await connection.execute(
                    """UPDATE batch_shards SET offered_at = now()
                    WHERE (job_id, shard) IN (SELECT * FROM unnest(%s::text[], %s::integer[]))
                      AND state = 'PENDING'""",
                    ([job for job, _, _ in shards], [int(shard) for _, _, shard in shards]),
                )

    # --- workers --------------------------------------------------------------------------

    async def lease_shard(self, job_id: str, shard: int, owner: str, lease: timedelta) -> ShardLease | None:
        """Claim a shard that is pending, or whose lease ran out, of a job that is still active.
        None when the shard is finished, cancelled or held by a live worker."""
        async with self.database.transaction() as connection:
            if not await _lock_active_job(connection, job_id):
                return None
            cursor = await connection.execute(
                """UPDATE batch_shards SET state = 'LEASED', lease_owner = %(owner)s,
                    lease_expires = now() + %(lease)s, attempts = attempts + 1
                WHERE job_id = %(job)s AND shard = %(shard)s
                  AND (state = 'PENDING' OR (state = 'LEASED' AND lease_expires < now()))
                RETURNING *""",
                {"owner": owner, "lease": lease, "job": job_id, "shard": shard},
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            await connection.execute(
                """UPDATE batch_jobs SET state = 'RUNNING', start_time = now()
                WHERE id = %s AND state = 'QUEUED'""",
                (job_id,),
            )
            cursor = await connection.execute(JOB_QUERY + " WHERE j.id = %s", (job_id,))
            job_row = await cursor.fetchone()
        assert job_row is not None
        return ShardLease(
            job=job_from_row(job_row),
            shard=shard_from_row(row),
            owner=owner,
            attempt=row["attempts"],
            npy=npy_layout_from_row(job_row),
        )

    async def renew_lease(self, lease: ShardLease, duration: timedelta) -> bool:
        """Extend the lease; False when the shard is no longer this worker's to finish."""
        async with self.database.transaction() as connection:
            cursor = await connection.execute(
                """UPDATE batch_shards SET lease_expires = now() + %s
                WHERE job_id = %s AND shard = %s AND state = 'LEASED' AND lease_owner = %s
                  AND attempts = %s RETURNING 1""",
                (duration, lease.job.id, lease.shard.index, lease.owner, lease.attempt),
            )
            return await cursor.fetchone() is not None

    async def complete_shard(self, lease: ShardLease, outcome: ShardOutcome) -> Completion:
        """Mark the shard done and count its rows, once: not recorded when it was already
        finished or cancelled. Another worker's lease does not stop it: its result is the same
        object under the same key."""
        async with self.database.transaction() as connection:
            if not await _lock_active_job(connection, lease.job.id):
                return Completion(recorded=False, job_finished=False)
            cursor = await connection.execute(
                """UPDATE batch_shards SET state = 'DONE', result = %s, errors = %s,
                    lease_owner = NULL, lease_expires = NULL
                WHERE job_id = %s AND shard = %s AND state IN ('PENDING', 'LEASED') RETURNING 1""",
                (
                    Jsonb(outcome.result.to_json()),
                    Jsonb(outcome.errors.to_json()) if outcome.errors else None,
                    lease.job.id,
                    lease.shard.index,
                ),
            )
            if await cursor.fetchone() is None:
                return Completion(recorded=False, job_finished=False)
            cursor = await connection.execute(
                """UPDATE batch_jobs SET rows_done = rows_done + %s, rows_failed = rows_failed + %s,
                    shards_done = shards_done + 1 WHERE id = %s
                RETURNING shards_done >= shards_total AS finished""",
                (outcome.rows_done, outcome.rows_failed, lease.job.id),
            )
            row = await cursor.fetchone()
        return Completion(recorded=True, job_finished=bool(row and row["finished"]))

    async def census(self) -> tuple[dict[str, int], int]:
        """Jobs by state, and shards not yet done (pending or leased) across all jobs."""
        async with self.database.transaction() as connection:
            cursor = await connection.execute("SELECT state, count(*) AS n FROM batch_jobs GROUP BY state")
            jobs = {row["state"]: int(row["n"]) for row in await cursor.fetchall()}
            cursor = await connection.execute(
                "SELECT count(*) AS n FROM batch_shards WHERE state IN ('PENDING', 'LEASED')"
            )
            row = await cursor.fetchone()
        return jobs, int(row["n"]) if row else 0

    async def shard_state(self, job_id: str, shard: int) -> str | None:
        async with self.database.transaction() as connection:
            cursor = await connection.execute(
                "SELECT state FROM batch_shards WHERE job_id = %s AND shard = %s", (job_id, shard)
            )
            row = await cursor.fetchone()
        return row["state"] if row else None

    async def release_shard(self, lease: ShardLease, error: str) -> None:
        """Give up this attempt: the lease ends now, so the reaper hands the shard out again."""
        async with self.database.transaction() as connection:
            await connection.execute(
                """UPDATE batch_shards SET lease_expires = now(), last_error = %s
                WHERE job_id = %s AND shard = %s AND state = 'LEASED' AND lease_owner = %s
                  AND attempts = %s""",
                (error, lease.job.id, lease.shard.index, lease.owner, lease.attempt),
            )

    async def give_back(self, lease: ShardLease) -> None:
        """End this attempt for no fault of the shard's (its worker is stopping): the reaper hands
        it out again whatever its attempts, since a stopping worker may take it and give it back
        more than once."""
        await self.release_shard(lease, GIVEN_BACK)

    # --- the reaper -----------------------------------------------------------------------

    async def requeue_expired(self, max_attempts: int) -> tuple[int, int]:
        """Hand out again the shards whose lease ran out (their worker died or gave up); a shard
        that used up its attempts fails with all its rows. Returns (requeued, failed)."""
        async with self.database.transaction() as connection:
            cursor = await connection.execute(
                """SELECT s.job_id, s.shard, s.attempts, s.last_error, s.row_count, j.tenant,
                    j.trace_context, j.priority
                FROM batch_shards s JOIN batch_jobs j ON j.id = s.job_id
                WHERE s.state = 'LEASED' AND s.lease_expires < now()
                FOR UPDATE OF j, s SKIP LOCKED"""
            )
            expired = await cursor.fetchall()
            exhausted = [
                r for r in expired if r["attempts"] >= max_attempts and r["last_error"] != GIVEN_BACK
            ]
            requeue = [r for r in expired if r not in exhausted]
            async with connection.cursor() as batch:
                await batch.executemany(
                    """UPDATE batch_shards SET state = 'PENDING', lease_owner = NULL, lease_expires = NULL,
                        offered_at = now()
                    WHERE job_id = %s AND shard = %s""",
                    [(r["job_id"], r["shard"]) for r in requeue],
                )
                await batch.executemany(
                    INSERT_OUTBOX,
                    [
                        shard_message(r["job_id"], r["shard"], r["tenant"], r["trace_context"], r["priority"])
                        for r in requeue
                    ],
                )
                await batch.executemany(
                    """UPDATE batch_shards SET state = 'FAILED', lease_owner = NULL, lease_expires = NULL
                    WHERE job_id = %s AND shard = %s""",
                    [(r["job_id"], r["shard"]) for r in exhausted],
                )
                await batch.executemany(
                    """UPDATE batch_jobs SET rows_failed = rows_failed + %s, shards_done = shards_done + 1
                    WHERE id = %s""",
                    [(r["row_count"], r["job_id"]) for r in exhausted],
                )
        return len(requeue), len(exhausted)

    async def republish_unclaimed(self, offered_before: timedelta) -> int:
        """Publish again the pending shards of active jobs that were offered longer than
        `offered_before` ago and that no worker took, unless their message still waits in the
        outbox: the broker lost it (a broker restarted without its data, a topic recreated).
        A shard is leased and counted once, so a message that was only slow costs a look-up.
        Returns how many were republished."""
        async with self.database.transaction() as connection:
            cursor = await connection.execute(
                """SELECT s.job_id, s.shard, j.tenant, j.trace_context, j.priority
                FROM batch_shards s JOIN batch_jobs j ON j.id = s.job_id
                WHERE s.state = 'PENDING' AND s.offered_at < now() - %s
                  AND j.state IN ('QUEUED', 'RUNNING')
                  AND NOT EXISTS (SELECT 1 FROM batch_outbox o
                      WHERE o.job_id = s.job_id AND o.key = convert_to(s.job_id || '/' || s.shard, 'UTF8'))
                FOR UPDATE OF s SKIP LOCKED""",
                (offered_before,),
            )
            unclaimed = await cursor.fetchall()
            async with connection.cursor() as batch:
                await batch.executemany(
                    "UPDATE batch_shards SET offered_at = now() WHERE job_id = %s AND shard = %s",
                    [(r["job_id"], r["shard"]) for r in unclaimed],
                )
                await batch.executemany(
                    INSERT_OUTBOX,
                    [
                        shard_message(r["job_id"], r["shard"], r["tenant"], r["trace_context"], r["priority"])
                        for r in unclaimed
                    ],
                )
        return len(unclaimed)

    async def jobs_to_finalize(self) -> list[str]:
        """Running jobs whose every shard has finished."""
        async with self.database.transaction() as connection:
            cursor = await connection.execute(
                """SELECT id FROM batch_jobs
                WHERE state = 'RUNNING' AND planned AND shards_done >= shards_total"""
            )
            return [row["id"] for row in await cursor.fetchall()]

    @asynccontextmanager
    async def job_to_finalize(
        self, job_id: str
    ) -> AsyncIterator[tuple[Connection, Job, list[ShardRecord]] | None]:
        """The job and its shards, locked against other finalizers, when it is running with
        every shard finished; None otherwise."""
        async with self.database.transaction() as connection:
            cursor = await connection.execute(
                JOB_QUERY
                + """ WHERE j.id = %s AND j.state = 'RUNNING' AND j.planned
                  AND j.shards_done >= j.shards_total FOR UPDATE OF j SKIP LOCKED""",
                (job_id,),
            )
            row = await cursor.fetchone()
            if row is None:
                yield None
                return
            cursor = await connection.execute(
                "SELECT * FROM batch_shards WHERE job_id = %s ORDER BY shard", (job_id,)
            )
            shards = [
                ShardRecord(
                    plan=shard_from_row(s),
                    state=s["state"],
                    last_error=s["last_error"],
                    result=StoredObject.from_json(s["result"]) if s["result"] else None,
                    errors=StoredObject.from_json(s["errors"]) if s["errors"] else None,
                )
                for s in await cursor.fetchall()
            ]
            yield connection, job_from_row(row), shards

    async def finish_job(
        self,
        connection: Connection,
        *,
        job_id: str,
        state: JobState,
        failure_reason: str,
        manifest: StoredObject,
        errors: StoredObject | None,
    ) -> None:
        """Within `job_to_finalize`: record the final state and the objects that describe it."""
        await connection.execute(
            """UPDATE batch_jobs SET state = %s, failure_reason = %s, manifest = %s, errors = %s,
                end_time = now() WHERE id = %s""",
            (
                state.value,
                failure_reason,
                Jsonb(manifest.to_json()),
                Jsonb(errors.to_json()) if errors else None,
                job_id,
            ),
        )


async def _lock_active_job(connection: Connection, job_id: str) -> bool:
    """Lock the job row if the job is still active. Every transaction that changes a job and
    its shards locks the job first, so they never deadlock on each other."""
    cursor = await connection.execute(
        "SELECT 1 FROM batch_jobs WHERE id = %s AND state IN ('QUEUED', 'RUNNING') FOR NO KEY UPDATE",
        (job_id,),
    )
    return await cursor.fetchone() is not None


async def _fail(connection: Connection, job_id: str, reason: str) -> bool:
    cursor = await connection.execute(
        """UPDATE batch_jobs SET state = 'FAILED', failure_reason = %s, end_time = now(), planned = true
        WHERE id = %s AND state IN ('QUEUED', 'RUNNING') RETURNING id""",
        (reason, job_id),
    )
    if await cursor.fetchone() is None:
        return False
    await _drop_unfinished_shards(connection, job_id)
    return True


async def _drop_unfinished_shards(connection: Connection, job_id: str) -> None:
    """The job has ended early: no worker may finish its shards, and none need publishing."""
    # The outbox first: the relay locks outbox rows and then their shards, so taking the shards
    # first here would deadlock with a relay publishing this job's messages.
    await connection.execute("DELETE FROM batch_outbox WHERE job_id = %s", (job_id,))
    await connection.execute(
        """UPDATE batch_shards SET state = 'CANCELLED', lease_owner = NULL, lease_expires = NULL
        WHERE job_id = %s AND state IN ('PENDING', 'LEASED')""",
        (job_id,),
    )
