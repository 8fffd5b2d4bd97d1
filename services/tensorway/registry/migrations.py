"""The registry's schema in PostgreSQL: models, versions, pools and their members,
deployments, readiness reports and rollouts, as versioned migrations applied on start (see
runtime.postgres.migrate)."""

from __future__ import annotations

from tensorway.runtime.postgres import Migration, Schema

# Any constant works; it only has to be the same in every replica ("tw-registry" in ASCII).
ADVISORY_LOCK_KEY = 0x74772D7265676973

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "models, versions, pools, deployments and the registry revision",
        (
            # One row: the revision every committed write increases, so replicas, caches and
            # watchers can tell newer from older.
            """CREATE TABLE registry_revision (
                singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
                revision bigint NOT NULL
            )""",
            "INSERT INTO registry_revision (revision) VALUES (0)",
            """CREATE TABLE models (
                name text PRIMARY KEY,
                description text NOT NULL DEFAULT '',
                labels jsonb NOT NULL DEFAULT '{}',
                create_time timestamptz NOT NULL DEFAULT now(),
                update_time timestamptz NOT NULL DEFAULT now(),
                row_version bigint NOT NULL DEFAULT 1
            )""",
            "CREATE INDEX models_labels ON models USING gin (labels jsonb_path_ops)",
            """CREATE TABLE model_versions (
                model text NOT NULL REFERENCES models (name) ON DELETE CASCADE,
                version text NOT NULL,
                seq bigint GENERATED ALWAYS AS IDENTITY,
                platform text NOT NULL,
                inputs jsonb NOT NULL,
                outputs jsonb NOT NULL,
                max_batch_size integer NOT NULL,
                artifact_uri text NOT NULL,
                stage text NOT NULL CHECK (stage IN ('DRAFT', 'STAGING', 'PRODUCTION', 'ARCHIVED')),
                metrics jsonb NOT NULL DEFAULT '{}',
                create_time timestamptz NOT NULL DEFAULT now(),
                update_time timestamptz NOT NULL DEFAULT now(),
                row_version bigint NOT NULL DEFAULT 1,
                PRIMARY KEY (model, version)
            )""",
            "CREATE UNIQUE INDEX model_versions_in_order ON model_versions (model, seq)",
            """CREATE TABLE pools (
                name text PRIMARY KEY,
                endpoints jsonb NOT NULL DEFAULT '[]',
                create_time timestamptz NOT NULL DEFAULT now(),
                update_time timestamptz NOT NULL DEFAULT now(),
                row_version bigint NOT NULL DEFAULT 1
            )""",
            """CREATE TABLE deployments (
                model text NOT NULL REFERENCES models (name) ON DELETE CASCADE,
                name text NOT NULL,
                pool text NOT NULL REFERENCES pools (name) ON DELETE RESTRICT,
                traffic jsonb NOT NULL,
                aliases jsonb NOT NULL DEFAULT '{}',
                shadow jsonb,
                create_time timestamptz NOT NULL DEFAULT now(),
                update_time timestamptz NOT NULL DEFAULT now(),
                row_version bigint NOT NULL DEFAULT 1,
                PRIMARY KEY (model, name)
            )""",
            "CREATE INDEX deployments_by_pool ON deployments (pool)",
        ),
    ),
    Migration(
        2,
        "model version states reported by each pool's orchestrators",
        (
            # One row per orchestrator that has reported: a pool with none is routed as before.
            """CREATE TABLE model_state_reporters (
                pool text NOT NULL REFERENCES pools (name) ON DELETE CASCADE,
                endpoint text NOT NULL,
                update_time timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (pool, endpoint)
            )""",
            """CREATE TABLE model_version_states (
                pool text NOT NULL,
                endpoint text NOT NULL,
                model text NOT NULL,
                version text NOT NULL,
                triton text NOT NULL,
                state text NOT NULL,
                reason text NOT NULL DEFAULT '',
                update_time timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (pool, endpoint, model, version, triton),
                FOREIGN KEY (pool, endpoint)
                    REFERENCES model_state_reporters (pool, endpoint) ON DELETE CASCADE
            )""",
            "CREATE INDEX model_version_states_by_model ON model_version_states (model)",
        ),
    ),
    Migration(
        3,
        "pool members: orchestrators that joined their pool with a lease",
        (
            # Beside the pool's hand-set endpoints: routes carry both. A member whose lease ran
            # out is deleted by the registry's sweep (`membership.MemberSweep`).
            """CREATE TABLE pool_members (
                pool text NOT NULL REFERENCES pools (name) ON DELETE CASCADE,
                endpoint text NOT NULL,
                join_time timestamptz NOT NULL DEFAULT now(),
                expire_time timestamptz NOT NULL,
                PRIMARY KEY (pool, endpoint)
            )""",
            "CREATE INDEX pool_members_by_expiry ON pool_members (expire_time)",
        ),
    ),
    Migration(
        4,
        "measured rollouts and the routers' traffic reports they are judged by",
        (
            """CREATE TABLE rollouts (
                model text NOT NULL REFERENCES models (name) ON DELETE CASCADE,
                id bigint GENERATED ALWAYS AS IDENTITY,
                deployment text NOT NULL,
                from_version text NOT NULL,
                to_version text NOT NULL,
                steps integer[] NOT NULL,
                step_interval interval NOT NULL,
                bounds jsonb NOT NULL,
                state text NOT NULL
                    CHECK (state IN ('RUNNING', 'PAUSED', 'SUCCEEDED', 'ROLLED_BACK', 'ABORTED')),
                step_index integer NOT NULL DEFAULT 0,
                reason text NOT NULL DEFAULT '',
                to_figures jsonb,
                from_figures jsonb,
                last_judged timestamptz,
                create_time timestamptz NOT NULL DEFAULT now(),
                step_start_time timestamptz NOT NULL DEFAULT now(),
                end_time timestamptz,
                PRIMARY KEY (model, id)
            )""",
            # One rollout at a time per model: two would fight over its traffic.
            "CREATE UNIQUE INDEX rollouts_one_active ON rollouts (model)"
            " WHERE state IN ('RUNNING', 'PAUSED')",
            # Kept only for models under an active rollout, and only while a step may read them.
            """CREATE TABLE version_traffic (
                model text NOT NULL,
                version text NOT NULL,
                router text NOT NULL,
                report_time timestamptz NOT NULL DEFAULT now(),
                requests bigint NOT NULL,
                server_errors bigint NOT NULL,
                latency_bounds double precision[] NOT NULL,
                latency_counts bigint[] NOT NULL,
                shadow_matches bigint NOT NULL,
                shadow_mismatches bigint NOT NULL
            )""",
            "CREATE INDEX version_traffic_by_version ON version_traffic (model, version, report_time)",
        ),
    ),
)


SCHEMA = Schema("registry_schema_migrations", ADVISORY_LOCK_KEY, MIGRATIONS)
