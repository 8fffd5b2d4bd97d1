"""PostgreSQL, the truth of batch jobs: jobs, their shards, and the outbox of shard messages.

Every state change is one transaction, and a change that must reach Kafka (a shard to run)
writes its outbox row in the same transaction, so the database and the topic never disagree.
Shard completion is guarded by the shard's state, so a redelivered or re-leased shard is
counted once however many workers finish it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, LiteralString

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tensorway.batch.domain import (
    InputFormat,
    InputPlan,
    Job,
    JobSpec,
    JobState,
    NpyLayout,
    OutputFormat,
    Page,
    Progress,
    ShardLease,
    ShardOutcome,
    ShardPlan,
    StoredObject,
)
from tensorway.batch.v1 import shard_task_pb2
from tensorway.runtime import FieldViolation, InvalidArgument, NotFound, Unavailable
from tensorway.runtime.context import TENANT_HEADER

logger = logging.getLogger(__name__)

Connection = AsyncConnection[DictRow]
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Any constant works; it only has to be the same in every replica ("tw-batch" in ASCII).
ADVISORY_LOCK_KEY = 0x74772D6261746368

# Versioned migrations, applied once each, in order. Never edit a released one: add the next.
MIGRATIONS: tuple[tuple[int, tuple[LiteralString, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE batch_jobs (
                id text PRIMARY KEY,
                seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
                tenant text NOT NULL,
                request_id text,
                model text NOT NULL,
                model_version text NOT NULL,
                input_uri text NOT NULL,
                input_format text NOT NULL CHECK (input_format IN ('JSONL', 'NPY')),
                output_prefix text NOT NULL,
                shard_size integer NOT NULL CHECK (shard_size > 0),
                priority integer NOT NULL,
                state text NOT NULL CHECK (state IN
                    ('QUEUED', 'RUNNING', 'SUCCEEDED', 'PARTIALLY_FAILED', 'FAILED', 'CANCELLED')),
                planned boolean NOT NULL DEFAULT false,
                npy_layout jsonb,
                failure_reason text NOT NULL DEFAULT '',
                rows_total bigint NOT NULL DEFAULT 0,
                rows_done bigint NOT NULL DEFAULT 0,
                rows_failed bigint NOT NULL DEFAULT 0,
                shards_total integer NOT NULL DEFAULT 0,
                shards_done integer NOT NULL DEFAULT 0,
                manifest jsonb,
                errors jsonb,
                trace_context jsonb NOT NULL DEFAULT '{}',
                create_time timestamptz NOT NULL DEFAULT now(),
                start_time timestamptz,
                end_time timestamptz,
                UNIQUE (tenant, request_id)
            )""",
            "CREATE INDEX batch_jobs_by_tenant ON batch_jobs (tenant, seq DESC)",
            """CREATE INDEX batch_jobs_to_plan ON batch_jobs (priority DESC, seq)
                WHERE state = 'QUEUED' AND NOT planned""",
            """CREATE TABLE batch_shards (
                job_id text NOT NULL REFERENCES batch_jobs (id) ON DELETE CASCADE,
                shard integer NOT NULL,
                row_start bigint NOT NULL,
                row_count bigint NOT NULL,
                byte_start bigint NOT NULL,
                byte_end bigint NOT NULL,
                state text NOT NULL CHECK (state IN ('PENDING', 'LEASED', 'DONE', 'FAILED', 'CANCELLED')),
                lease_owner text,
                lease_expires timestamptz,
                attempts integer NOT NULL DEFAULT 0,
                last_error text NOT NULL DEFAULT '',
                result jsonb,
                errors jsonb,
                PRIMARY KEY (job_id, shard)
            )""",
            "CREATE INDEX batch_shards_leased ON batch_shards (lease_expires) WHERE state = 'LEASED'",
            """CREATE TABLE batch_outbox (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                job_id text NOT NULL,
                priority integer NOT NULL,
                key bytea NOT NULL,
                value bytea NOT NULL,
                headers jsonb NOT NULL
            )""",
            "CREATE INDEX batch_outbox_in_order ON batch_outbox (priority DESC, id)",
        ),
    ),
    (
        2,
        (
            # Every change of a job tells the API processes' watchers, who would otherwise only
            # see it at their next look: the channel is JOB_CHANGES_CHANNEL, the payload the id.
            """CREATE FUNCTION batch_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('tensorway_batch_job_changes', NEW.id);
                RETURN NULL;
            END $$""",
            """CREATE TRIGGER batch_job_changed AFTER UPDATE ON batch_jobs
                FOR EACH ROW EXECUTE FUNCTION batch_job_changed()""",
        ),
    ),
    (
        3,
        (
            # When a pending shard was last offered to the workers (its message published, or
            # it became pending): one offered long ago and never leased has lost its message.
            "ALTER TABLE batch_shards ADD COLUMN offered_at timestamptz NOT NULL DEFAULT now()",
        ),
    ),
    (
        4,
        (
            # The census counts the shards left every few seconds: from this small index of the
            # open ones, not from a scan of every shard ever run.
            """CREATE INDEX batch_shards_open ON batch_shards (state)
                WHERE state IN ('PENDING', 'LEASED')""",
        ),
    ),
    (
        5,
        (
            # The relay takes each tenant's next message in turn, so the outbox knows whose
            # each message is.
            "ALTER TABLE batch_outbox ADD COLUMN tenant text NOT NULL DEFAULT ''",
            "UPDATE batch_outbox o SET tenant = j.tenant FROM batch_jobs j WHERE j.id = o.job_id",
            "CREATE INDEX batch_outbox_by_tenant ON batch_outbox (tenant, priority DESC, id)",
        ),
    ),
    (
        6,
        (
            # Parquet in and out: a job names its output layout, and the columns its inputs and
            # row ids come from; a shard of a Parquet input is a row range of one of its files.
            "ALTER TABLE batch_jobs DROP CONSTRAINT batch_jobs_input_format_check",
            """ALTER TABLE batch_jobs ADD CONSTRAINT batch_jobs_input_format_check
                CHECK (input_format IN ('JSONL', 'NPY', 'PARQUET'))""",
            """ALTER TABLE batch_jobs ADD COLUMN output_format text NOT NULL DEFAULT 'JSONL'
                CHECK (output_format IN ('JSONL', 'PARQUET'))""",
            "ALTER TABLE batch_jobs ADD COLUMN input_columns jsonb NOT NULL DEFAULT '{}'",
            "ALTER TABLE batch_jobs ADD COLUMN id_column text NOT NULL DEFAULT ''",
            "ALTER TABLE batch_shards ADD COLUMN source text NOT NULL DEFAULT ''",
            "ALTER TABLE batch_shards ADD COLUMN source_row bigint NOT NULL DEFAULT 0",
        ),
    ),
)
JOB_CHANGES_CHANNEL: LiteralString = "tensorway_batch_job_changes"

# The results of a job are its done shards' objects, in shard order.
JOB_QUERY: LiteralString = """SELECT j.id, j.seq, j.tenant, j.model, j.model_version, j.input_uri,
    j.input_format, j.output_prefix, j.shard_size, j.priority, j.state, j.failure_reason,
    j.rows_total, j.rows_done, j.rows_failed, j.shards_total, j.shards_done, j.manifest, j.errors,
    j.trace_context, j.create_time, j.start_time, j.end_time, j.npy_layout,
    j.output_format, j.input_columns, j.id_column,
    (SELECT coalesce(jsonb_agg(s.result ORDER BY s.shard), '[]') FROM batch_shards s
     WHERE s.job_id = j.id AND s.result IS NOT NULL) AS results
    FROM batch_jobs j"""
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


def job_from_row(row: Mapping[str, Any]) -> Job:
    return Job(
        id=row["id"],
        tenant=row["tenant"],
        spec=JobSpec(
            model=row["model"],
            model_version=row["model_version"],
            input_uri=row["input_uri"],
            input_format=InputFormat(row["input_format"]),
            output_prefix=row["output_prefix"],
            shard_size=row["shard_size"],
            priority=row["priority"],
            output_format=OutputFormat(row["output_format"]),
            input_columns=tuple(sorted(row["input_columns"].items())),
            id_column=row["id_column"],
        ),
        state=JobState(row["state"]),
        progress=Progress(
            rows_total=row["rows_total"],
            rows_done=row["rows_done"],
            rows_failed=row["rows_failed"],
            shards_total=row["shards_total"],
            shards_done=row["shards_done"],
        ),
        create_time=row["create_time"],
        failure_reason=row["failure_reason"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        manifest=StoredObject.from_json(row["manifest"]) if row["manifest"] else None,
        results=tuple(StoredObject.from_json(r) for r in row.get("results") or ()),
        errors=StoredObject.from_json(row["errors"]) if row["errors"] else None,
        trace_context=row["trace_context"],
    )


def _npy_layout(row: Mapping[str, Any]) -> NpyLayout | None:
    layout = row["npy_layout"]
    return NpyLayout(layout["dtype"], tuple(layout["row_shape"])) if layout else None


def _shard_from_row(row: Mapping[str, Any]) -> ShardPlan:
    return ShardPlan(
        row["shard"],
        row["row_start"],
        row["row_count"],
        row["byte_start"],
        row["byte_end"],
        row["source"],
        row["source_row"],
    )


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


@dataclass(frozen=True)
class OutboxBatch:
    """Messages to publish now, and how many more wait in the outbox for their turn or for room."""

    messages: list[OutboxMessage]
    left: int


@dataclass(frozen=True)
class OutboxMessage:
    """A record waiting to be published to the shards topic."""

    id: int
    key: bytes
    value: bytes
    headers: dict[str, str]


MAX_SEQ = 2**63 - 1


def _listing(tenant: str, terms: Mapping[str, str]) -> str:
    """What a page token is bound to: the tenant and the filter it lists (not the page size)."""
    text = json.dumps([tenant, sorted(terms.items())], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_page_token(seq: int, tenant: str, terms: Mapping[str, str]) -> str:
    """Where the next page starts, for this tenant and filter only."""
    return base64.urlsafe_b64encode(f"{seq}.{_listing(tenant, terms)}".encode()).decode()


def decode_page_token(token: str, tenant: str, terms: Mapping[str, str]) -> int:
    """The position a token of this listing holds; INVALID_ARGUMENT for anything else: a token
    that is no token, one of another tenant or another filter, or a position out of range."""
    refusal = InvalidArgument(
        "page_token is not one this server gave for this listing",
        [FieldViolation("page_token", "a next_page_token of the same listing (same filter), or empty")],
    )
    try:
        seq_text, _, listing = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii").partition(".")
        # int() takes '+', '_' and spaces: only plain digits came from this server.
        seq = int(seq_text) if seq_text.isascii() and seq_text.isdigit() else 0
    except (ValueError, binascii.Error) as exc:
        raise refusal from exc
    if not 0 < seq <= MAX_SEQ or not hmac.compare_digest(listing, _listing(tenant, terms)):
        raise refusal
    return seq


def parse_filter(text: str) -> dict[str, str]:
    """`state=RUNNING AND model=digits` → {"state": "RUNNING", "model": "digits"}."""
    terms: dict[str, str] = {}
    for term in (t.strip() for t in text.split(" AND ")) if text.strip() else ():
        field, _, value = term.partition("=")
        field, value = field.strip(), value.strip().strip('"')
        if field not in LIST_FILTER_FIELDS or not value:
            raise InvalidArgument(
                f"cannot filter on {term!r}",
                [FieldViolation("filter", "terms are state=STATE or model=NAME, joined by ' AND '")],
            )
        if field == "state" and value.removeprefix("JOB_STATE_") not in JobState.__members__:
            raise InvalidArgument(
                f"unknown state {value!r}", [FieldViolation("filter", f"states: {', '.join(JobState)}")]
            )
        terms[field] = value.removeprefix("JOB_STATE_") if field == "state" else value
    return terms


def shard_message(
    job_id: str, shard: int, tenant: str, trace_context: Mapping[str, str], priority: int
) -> dict[str, Any]:
    """The outbox row that hands one shard to the workers; its headers carry the job's trace."""
    task = shard_task_pb2.ShardTask(job=f"jobs/{job_id}", shard=shard)
    return {
        "job_id": job_id,
        "tenant": tenant,
        "priority": priority,
        # Keyed by job and shard, so a job's shards spread over the partitions and its workers.
        "key": f"{job_id}/{shard}".encode(),
        "value": task.SerializeToString(),
        "headers": Jsonb({**trace_context, TENANT_HEADER: tenant}),
    }


INSERT_OUTBOX: LiteralString = """INSERT INTO batch_outbox (job_id, tenant, priority, key, value, headers)
    VALUES (%(job_id)s, %(tenant)s, %(priority)s, %(key)s, %(value)s, %(headers)s)"""

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

    def __init__(self, pool: AsyncConnectionPool[Connection], retry_after: timedelta) -> None:
        self._pool = pool
        self._retry_after = retry_after

    @classmethod
    async def open(cls, url: str, *, max_size: int, wait: timedelta, retry_after: timedelta) -> JobStore:
        """Connect and bring the schema up to date (safe from several processes at once)."""
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            url,
            connection_class=AsyncConnection[DictRow],
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "connect_timeout": max(1, int(wait.total_seconds())),
            },
            min_size=1,
            max_size=max_size,
            timeout=wait.total_seconds(),
            check=AsyncConnectionPool.check_connection,
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=wait.total_seconds())
            async with pool.connection() as connection:
                applied = await migrate(connection)
        except BaseException:
            await pool.close()
            raise
        if applied:
            logger.info("batch schema migrated", extra={"versions": applied})
        return cls(pool, retry_after)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        try:
            async with self._pool.connection() as connection, connection.transaction():
                yield connection
        except psycopg.OperationalError as exc:
            logger.warning("PostgreSQL unreachable: %s", exc)
            raise Unavailable(
                "the batch database is unreachable; retry", retry_after=self._retry_after
            ) from exc

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
        async with self._transaction() as connection:
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
        async with self._transaction() as connection:
            job = await self._fetch_job(connection, job_id, tenant)
        if job is None:
            raise NotFound("job", f"jobs/{job_id}")
        return job

    async def job(self, job_id: str) -> Job | None:
        async with self._transaction() as connection:
            return await self._fetch_job(connection, job_id)

    async def list_jobs(self, tenant: str, filter_text: str, page_size: int, page_token: str) -> Page:
        """The tenant's jobs, newest first."""
        terms = parse_filter(filter_text)
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        params: dict[str, Any] = {
            "tenant": tenant,
            "state": terms.get("state"),
            "model": terms.get("model"),
            "before": decode_page_token(page_token, tenant, terms) if page_token else None,
            "limit": size + 1,
        }
        async with self._transaction() as connection:
            cursor = await connection.execute(
                JOB_QUERY
                + """ WHERE j.tenant = %(tenant)s
                  AND (%(state)s::text IS NULL OR j.state = %(state)s)
                  AND (%(model)s::text IS NULL OR j.model = %(model)s)
                  AND (%(before)s::bigint IS NULL OR j.seq < %(before)s)
                ORDER BY j.seq DESC LIMIT %(limit)s""",
                params,
            )
            rows = await cursor.fetchall()
        token = encode_page_token(rows[size - 1]["seq"], tenant, terms) if len(rows) > size else ""
        return Page(jobs=tuple(job_from_row(r) for r in rows[:size]), next_page_token=token)

    async def cancel_job(self, tenant: str, job_id: str) -> Job:
        """Cancel the job and every shard not yet finished; a cancelled job stays so."""
        async with self._transaction() as connection:
            cursor = await connection.execute(
                """UPDATE batch_jobs SET state = 'CANCELLED', end_time = now()
                WHERE id = %s AND tenant = %s AND state IN ('QUEUED', 'RUNNING') RETURNING id""",
                (job_id, tenant),
            )
            if await cursor.fetchone() is not None:
                await _drop_unfinished_shards(connection, job_id)
            job = await self._fetch_job(connection, job_id, tenant)
        if job is None:
            raise NotFound("job", f"jobs/{job_id}")
        return job

    # --- planning -------------------------------------------------------------------------

    @asynccontextmanager
    async def job_to_plan(self) -> AsyncIterator[tuple[Connection, Job] | None]:
        """The most urgent job not yet divided into shards, locked against other planners
        until the block ends; None when there is none."""
        async with self._transaction() as connection:
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
        async with self._transaction() as connection:
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
        async with self._transaction() as connection:
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
        async with self._transaction() as connection:
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
            shard=_shard_from_row(row),
            owner=owner,
            attempt=row["attempts"],
            npy=_npy_layout(job_row),
        )

    async def renew_lease(self, lease: ShardLease, duration: timedelta) -> bool:
        """Extend the lease; False when the shard is no longer this worker's to finish."""
        async with self._transaction() as connection:
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
        async with self._transaction() as connection:
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
        async with self._transaction() as connection:
            cursor = await connection.execute("SELECT state, count(*) AS n FROM batch_jobs GROUP BY state")
            jobs = {row["state"]: int(row["n"]) for row in await cursor.fetchall()}
            cursor = await connection.execute(
                "SELECT count(*) AS n FROM batch_shards WHERE state IN ('PENDING', 'LEASED')"
            )
            row = await cursor.fetchone()
        return jobs, int(row["n"]) if row else 0

    async def shard_state(self, job_id: str, shard: int) -> str | None:
        async with self._transaction() as connection:
            cursor = await connection.execute(
                "SELECT state FROM batch_shards WHERE job_id = %s AND shard = %s", (job_id, shard)
            )
            row = await cursor.fetchone()
        return row["state"] if row else None

    async def release_shard(self, lease: ShardLease, error: str) -> None:
        """Give up this attempt: the lease ends now, so the reaper hands the shard out again."""
        async with self._transaction() as connection:
            await connection.execute(
                """UPDATE batch_shards SET lease_expires = now(), last_error = %s
                WHERE job_id = %s AND shard = %s AND state = 'LEASED' AND lease_owner = %s
                  AND attempts = %s""",
                (error, lease.job.id, lease.shard.index, lease.owner, lease.attempt),
            )

    # --- the reaper -----------------------------------------------------------------------

    async def requeue_expired(self, max_attempts: int) -> tuple[int, int]:
        """Hand out again the shards whose lease ran out (their worker died or gave up); a shard
        that used up its attempts fails with all its rows. Returns (requeued, failed)."""
        async with self._transaction() as connection:
            cursor = await connection.execute(
                """SELECT s.job_id, s.shard, s.attempts, s.row_count, j.tenant, j.trace_context, j.priority
                FROM batch_shards s JOIN batch_jobs j ON j.id = s.job_id
                WHERE s.state = 'LEASED' AND s.lease_expires < now()
                FOR UPDATE OF j, s SKIP LOCKED"""
            )
            expired = await cursor.fetchall()
            requeue = [r for r in expired if r["attempts"] < max_attempts]
            exhausted = [r for r in expired if r["attempts"] >= max_attempts]
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
        async with self._transaction() as connection:
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
        async with self._transaction() as connection:
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
        async with self._transaction() as connection:
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
                    plan=_shard_from_row(s),
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


class JobChanges:
    """Wakes the watchers of a job when its row changes, from the notifications PostgreSQL
    sends on every update of a job. Watchers still look on their own at their interval, so a
    lost connection only makes them slower until it is back."""

    name = "job changes"

    def __init__(
        self, url: str, retry_after: timedelta, on_any_change: Callable[[], None] | None = None
    ) -> None:
        self._url = url
        self._retry_after = retry_after
        self._on_any_change = on_any_change
        self._waiters: dict[str, set[asyncio.Event]] = {}

    @contextmanager
    def watching(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever the job changes, for as long as the block runs."""
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters[job_id]
            waiters.discard(event)
            if not waiters:
                del self._waiters[job_id]

    async def run(self) -> None:
        """Listen until cancelled, connecting again after a failure."""
        while True:
            try:
                async with await AsyncConnection.connect(self._url, autocommit=True) as connection:
                    await connection.execute("LISTEN " + JOB_CHANGES_CHANNEL)
                    # What changed while nobody listened is seen by looking again.
                    for waiters in self._waiters.values():
                        for event in waiters:
                            event.set()
                    async for notify in connection.notifies():
                        for event in self._waiters.get(notify.payload, ()):
                            event.set()
                        if self._on_any_change is not None:
                            self._on_any_change()
            except Exception:
                logger.warning("job change notifications lost; listening again", exc_info=True)
            await asyncio.sleep(self._retry_after.total_seconds())


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


async def migrate(connection: Connection) -> list[int]:
    """Apply the migrations this database lacks; returns the versions applied."""
    applied_now = []
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        await connection.execute(
            """CREATE TABLE IF NOT EXISTS batch_schema_migrations (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )"""
        )
        cursor = await connection.execute("SELECT version FROM batch_schema_migrations")
        applied = {row["version"] for row in await cursor.fetchall()}
        for version, statements in MIGRATIONS:
            if version in applied:
                continue
            for statement in statements:
                await connection.execute(statement)
            await connection.execute("INSERT INTO batch_schema_migrations (version) VALUES (%s)", (version,))
            applied_now.append(version)
    return applied_now
