"""The batch service's schema in PostgreSQL: jobs, their shards and the outbox of shard
messages, as versioned migrations applied on start (see runtime.postgres.migrate)."""

from __future__ import annotations

from typing import LiteralString

from tensorway.runtime.postgres import Migration, Schema

JOB_CHANGES_CHANNEL: LiteralString = "tensorway_batch_job_changes"
"""Where every change of a job is notified, the job's id the payload (migration 2)."""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "jobs, their shards and the outbox",
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
    Migration(
        2,
        "every change of a job is notified",
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
    Migration(
        3,
        "when a pending shard was last offered",
        (
            # When a pending shard was last offered to the workers (its message published, or
            # it became pending): one offered long ago and never leased has lost its message.
            "ALTER TABLE batch_shards ADD COLUMN offered_at timestamptz NOT NULL DEFAULT now()",
        ),
    ),
    Migration(
        4,
        "an index of the open shards",
        (
            # The census counts the shards left every few seconds: from this small index of the
            # open ones, not from a scan of every shard ever run.
            """CREATE INDEX batch_shards_open ON batch_shards (state)
                WHERE state IN ('PENDING', 'LEASED')""",
        ),
    ),
    Migration(
        5,
        "outbox messages know their tenant",
        (
            # The relay takes each tenant's next message in turn, so the outbox knows whose
            # each message is.
            "ALTER TABLE batch_outbox ADD COLUMN tenant text NOT NULL DEFAULT ''",
            "UPDATE batch_outbox o SET tenant = j.tenant FROM batch_jobs j WHERE j.id = o.job_id",
            "CREATE INDEX batch_outbox_by_tenant ON batch_outbox (tenant, priority DESC, id)",
        ),
    ),
    Migration(
        6,
        "Parquet inputs and outputs",
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

SCHEMA = Schema(
    record_table="batch_schema_migrations",
    # Any constant works; it only has to be the same in every replica ("tw-batch" in ASCII).
    lock_key=0x74772D6261746368,
    migrations=MIGRATIONS,
)
