"""PostgreSQL, the registry's truth: reads, write transactions and change notifications.

Every committed write increases the one registry revision inside its transaction and sends a
NOTIFY with it, so commits, revisions and notifications come in the same order. Etags are
row version counters; an update names the version it read (`WHERE row_version = ...`), so a
write that lost a race is refused (ABORTED) instead of silently overwriting.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, LiteralString

from psycopg import errors
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from tensorway.registry import migrations
from tensorway.registry.domain import (
    DEFAULT_MIN_READY_SHARE,
    DEPLOYMENT,
    MODEL,
    MODEL_VERSION,
    POOL,
    Change,
    Deployment,
    Model,
    ModelFilter,
    ModelStateReport,
    ModelVersion,
    ModelVersionFilter,
    ModelVersionState,
    Page,
    Pool,
    Route,
    Shadow,
    Stage,
    TensorSpec,
    TrafficSplit,
    TritonModelState,
    Versioned,
    VersionRoute,
    build_route,
)
from tensorway.runtime import Aborted, AlreadyExists, FailedPrecondition, NotFound
from tensorway.runtime.postgres import Connection, Database, PageCursor

CHANGES_CHANNEL: LiteralString = "tensorway_registry_changes"
# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more; a change naming more models than
# fit is sent as several notifications with the same revision.
MAX_NOTIFY_BYTES = 7000
MAX_PAGE_SIZE = 1000


# One statement, so the routes and the revision they belong to come from one snapshot.
ROUTES_QUERY = """
SELECT r.revision,
  (SELECT coalesce(jsonb_agg(jsonb_build_object(
      'model', d.model, 'name', d.name, 'pool', d.pool, 'traffic', d.traffic,
      'aliases', d.aliases, 'shadow', d.shadow, 'endpoints', p.endpoints, 'members', {members})
      ORDER BY d.model, d.name), '[]')
   FROM deployments d JOIN pools p ON p.name = d.pool {deployments_of}) AS deployments,
  (SELECT coalesce(jsonb_agg(jsonb_build_object(
      'model', v.model, 'version', v.version, 'platform', v.platform, 'inputs', v.inputs,
      'outputs', v.outputs, 'max_batch_size', v.max_batch_size, 'artifact_uri', v.artifact_uri)), '[]')
   FROM model_versions v
   WHERE v.stage <> 'ARCHIVED' AND EXISTS (SELECT 1 FROM deployments d WHERE d.model = v.model)
   {versions_of}) AS versions,
  (SELECT coalesce(jsonb_agg(jsonb_build_object(
      'pool', s.pool, 'endpoint', s.endpoint, 'model', s.model, 'version', s.version,
      'triton', s.triton, 'state', s.state, 'reason', s.reason, 'update_time', s.update_time)
      ORDER BY s.endpoint, s.triton), '[]')
   FROM model_version_states s {states_of}) AS states,
  (SELECT coalesce(jsonb_agg(jsonb_build_object('pool', m.pool, 'endpoint', m.endpoint)), '[]')
   FROM model_state_reporters m) AS reporters
FROM registry_revision r
"""
# A pool's members that it does not also list by hand: the endpoints of its routes are both.
POOL_MEMBERS: LiteralString = """coalesce((SELECT jsonb_agg(m.endpoint ORDER BY m.endpoint)
      FROM pool_members m WHERE m.pool = p.name AND NOT p.endpoints ? m.endpoint), '[]')"""
ROUTE_OF_MODEL: LiteralString = ROUTES_QUERY.format(
    members=POOL_MEMBERS,
    deployments_of="WHERE d.model = %(model)s",
    versions_of="AND v.model = %(model)s",
    states_of="WHERE s.model = %(model)s",
)
ALL_ROUTES: LiteralString = ROUTES_QUERY.format(
    members=POOL_MEMBERS, deployments_of="", versions_of="", states_of=""
)


def etag_of(row: Mapping[str, Any]) -> str:
    return str(row["row_version"])


def row_version(etag: str) -> int:
    return int(etag)


def _specs(items: Iterable[Mapping[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(item["name"], item["datatype"], tuple(item["shape"])) for item in items)


def _specs_json(specs: Iterable[TensorSpec]) -> Jsonb:
    return Jsonb([{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs])


def model_from_row(row: Mapping[str, Any]) -> Model:
    return Model(
        name=row["name"],
        description=row["description"],
        labels=row["labels"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        etag=etag_of(row),
    )


def version_from_row(row: Mapping[str, Any]) -> ModelVersion:
    return ModelVersion(
        model=row["model"],
        version=row["version"],
        platform=row["platform"],
        inputs=_specs(row["inputs"]),
        outputs=_specs(row["outputs"]),
        max_batch_size=row["max_batch_size"],
        artifact_uri=row.get("artifact_uri", ""),
        stage=Stage(row.get("stage", Stage.DRAFT.value)),
        metrics=row.get("metrics", {}),
        create_time=row.get("create_time"),
        update_time=row.get("update_time"),
        etag=etag_of(row) if "row_version" in row else "",
    )


def pool_from_row(row: Mapping[str, Any]) -> Pool:
    return Pool(
        name=row["name"],
        endpoints=tuple(row["endpoints"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        etag=etag_of(row),
    )


def deployment_from_row(row: Mapping[str, Any]) -> Deployment:
    shadow = row["shadow"]
    return Deployment(
        model=row["model"],
        name=row["name"],
        pool=row["pool"],
        traffic=tuple(TrafficSplit(item["version"], item["weight"]) for item in row["traffic"]),
        aliases=row["aliases"],
        shadow=None if shadow is None else Shadow(shadow["version"], shadow["percent"]),
        create_time=row.get("create_time"),
        update_time=row.get("update_time"),
        etag=etag_of(row) if "row_version" in row else "",
    )


def _deployment_params(deployment: Deployment) -> dict[str, Any]:
    shadow = deployment.shadow
    return {
        "model": deployment.model,
        "name": deployment.name,
        "pool": deployment.pool,
        "traffic": Jsonb([{"version": s.version, "weight": s.weight} for s in deployment.traffic]),
        "aliases": Jsonb(dict(deployment.aliases)),
        "shadow": None if shadow is None else Jsonb({"version": shadow.version, "percent": shadow.percent}),
    }


def _version_params(version: ModelVersion) -> dict[str, Any]:
    return {
        "model": version.model,
        "version": version.version,
        "platform": version.platform,
        "inputs": _specs_json(version.inputs),
        "outputs": _specs_json(version.outputs),
        "max_batch_size": version.max_batch_size,
        "artifact_uri": version.artifact_uri,
        "stage": version.stage.value,
        "metrics": Jsonb(dict(version.metrics)),
    }


def routes_from_row(
    row: Mapping[str, Any], min_ready_share: float = DEFAULT_MIN_READY_SHARE
) -> dict[str, Route]:
    """Routes by model from a ROUTES_QUERY row."""
    reporters: dict[str, set[str]] = {}
    for item in row.get("reporters", ()):
        reporters.setdefault(item["pool"], set()).add(item["endpoint"])
    states: dict[str, dict[tuple[str, str], list[TritonModelState]]] = {}
    for item in row.get("states", ()):
        states.setdefault(item["model"], {}).setdefault((item["version"], item["pool"]), []).append(
            TritonModelState(
                endpoint=item["endpoint"],
                triton=item["triton"],
                state=ModelVersionState(item["state"]),
                reason=item["reason"],
                update_time=datetime.fromisoformat(item["update_time"]),
            )
        )
    frozen_reporters = {pool: frozenset(endpoints) for pool, endpoints in reporters.items()}
    deployments: dict[str, list[Deployment]] = {}
    endpoints: dict[str, tuple[str, ...]] = {}
    members: dict[str, frozenset[str]] = {}
    for item in row["deployments"]:
        deployments.setdefault(item["model"], []).append(deployment_from_row(item))
        endpoints[item["pool"]] = (*item["endpoints"], *item.get("members", ()))
        members[item["pool"]] = frozenset(item.get("members", ()))
    versions: dict[str, dict[str, ModelVersion]] = {}
    for item in row["versions"]:
        versions.setdefault(item["model"], {})[item["version"]] = version_from_row(item)
    routes = {}
    for model, its_deployments in deployments.items():
        route = build_route(
            model,
            its_deployments,
            endpoints,
            versions.get(model, {}),
            frozen_reporters,
            states.get(model, {}),
            min_ready_share,
        )
        if route is not None:
            routes[model] = _members_serve_when_ready(route, members)
    return routes


def _members_serve_when_ready(route: Route, members: Mapping[str, frozenset[str]]) -> Route:
    """The route with each version sent only to the pool members that report it ready, beside
    the endpoints set by hand: an orchestrator that just joined gets a version's traffic once it
    has fetched, loaded and warmed it. Members of a pool that reports no states all serve."""

    def serving(version: VersionRoute) -> VersionRoute:
        joined = members.get(version.pool, frozenset())
        readiness = version.readiness
        if not joined or readiness is None or readiness.state is ModelVersionState.UNSPECIFIED:
            return version
        ready = {t.endpoint for t in readiness.tritons if t.state is ModelVersionState.READY}
        return replace(
            version, endpoints=tuple(e for e in version.endpoints if e not in joined or e in ready)
        )

    return replace(route, versions=tuple(serving(version) for version in route.versions))


class RegistryStore:
    """The registry's tables in PostgreSQL, through a connection pool."""

    def __init__(self, database: Database, min_ready_share: float = DEFAULT_MIN_READY_SHARE) -> None:
        self.database = database
        self.min_ready_share = min_ready_share

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int,
        wait: timedelta,
        retry_after: timedelta,
        min_ready_share: float = DEFAULT_MIN_READY_SHARE,
    ) -> RegistryStore:
        """Connect, and bring the schema up to date. A call waits up to `wait` for a
        connection before it fails UNAVAILABLE. `min_ready_share` is the share of a pool's
        endpoints that must have a version ready before its route gives it traffic."""
        database = await Database.open(
            url,
            migrations.SCHEMA,
            size=pool_size,
            wait=wait,
            retry_after=retry_after,
            what="the registry's database",
        )
        return cls(database, min_ready_share)

    async def close(self) -> None:
        await self.database.close()

    async def _one(self, query: LiteralString, params: Mapping[str, Any]) -> DictRow | None:
        async with self.database.connection() as connection:
            cursor = await connection.execute(query, params)
            return await cursor.fetchone()

    async def _all(self, query: LiteralString, params: Mapping[str, Any]) -> list[DictRow]:
        async with self.database.connection() as connection:
            cursor = await connection.execute(query, params)
            return await cursor.fetchall()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Writer]:
        """A write transaction. What it `touch`es is committed with a new revision and a NOTIFY;
        `writer.change` holds them after the block. PostgreSQL down gives UNAVAILABLE."""
        async with self.database.transaction() as connection:
            writer = Writer(connection)
            yield writer
            await writer.commit_change()

    # Reads. Each returns the revision it read at, which the cache keeps with the value.

    async def get_model(self, name: str) -> Versioned[Model]:
        row = await self._one(
            "SELECT * FROM models, registry_revision r WHERE name = %(name)s",
            {"name": name},
        )
        if row is None:
            raise NotFound(MODEL, f"models/{name}")
        return Versioned(model_from_row(row), row["revision"])

    async def list_models(self, where: ModelFilter, page_size: int, page_token: str) -> Page[Model]:
        cursor = PageCursor(
            page_size,
            page_token,
            json.dumps(["models", sorted(where.labels.items())]),
            max_page_size=MAX_PAGE_SIZE,
        )
        rows = await self._all(
            "SELECT * FROM models WHERE labels @> %(labels)s"
            " AND (%(after)s::text IS NULL OR name > %(after)s) ORDER BY name LIMIT %(limit)s",
            {"labels": Jsonb(dict(where.labels)), "after": cursor.after, "limit": cursor.limit + 1},
        )
        page, token = cursor.page(rows, "name")
        return Page([model_from_row(row) for row in page], token)

    async def get_model_version(self, model: str, version: str) -> Versioned[ModelVersion]:
        row = await self._one(
            "SELECT * FROM model_versions, registry_revision r"
            " WHERE model = %(model)s AND version = %(version)s",
            {"model": model, "version": version},
        )
        if row is None:
            raise NotFound(MODEL_VERSION, f"models/{model}/versions/{version}")
        return Versioned(version_from_row(row), row["revision"])

    async def list_model_versions(
        self, model: str, where: ModelVersionFilter, page_size: int, page_token: str
    ) -> Page[ModelVersion]:
        query = json.dumps(["versions", model, where.stage and where.stage.value, where.platform])
        cursor = PageCursor(page_size, page_token, query, int, max_page_size=MAX_PAGE_SIZE)
        rows = await self._all(
            "SELECT * FROM model_versions WHERE model = %(model)s"
            " AND (%(stage)s::text IS NULL OR stage = %(stage)s)"
            " AND (%(platform)s::text IS NULL OR platform = %(platform)s)"
            " AND (%(after)s::bigint IS NULL OR seq > %(after)s) ORDER BY seq LIMIT %(limit)s",
            {
                "model": model,
                "stage": where.stage and where.stage.value,
                "platform": where.platform,
                "after": cursor.after,
                "limit": cursor.limit + 1,
            },
        )
        if not rows and cursor.after is None:
            await self.get_model(model)  # an unknown parent is NOT_FOUND, not an empty list
        page, token = cursor.page(rows, "seq")
        return Page([version_from_row(row) for row in page], token)

    async def get_pool(self, name: str) -> Versioned[Pool]:
        row = await self._one(
            "SELECT * FROM pools, registry_revision r WHERE name = %(name)s",
            {"name": name},
        )
        if row is None:
            raise NotFound(POOL, f"pools/{name}")
        return Versioned(pool_from_row(row), row["revision"])

    async def list_pools(self, page_size: int, page_token: str) -> Page[Pool]:
        cursor = PageCursor(page_size, page_token, json.dumps(["pools"]), max_page_size=MAX_PAGE_SIZE)
        rows = await self._all(
            "SELECT * FROM pools WHERE (%(after)s::text IS NULL OR name > %(after)s)"
            " ORDER BY name LIMIT %(limit)s",
            {"after": cursor.after, "limit": cursor.limit + 1},
        )
        page, token = cursor.page(rows, "name")
        return Page([pool_from_row(row) for row in page], token)

    async def get_deployment(self, model: str, name: str) -> Versioned[Deployment]:
        row = await self._one(
            "SELECT * FROM deployments, registry_revision r WHERE model = %(model)s AND name = %(name)s",
            {"model": model, "name": name},
        )
        if row is None:
            raise NotFound(DEPLOYMENT, f"models/{model}/deployments/{name}")
        return Versioned(deployment_from_row(row), row["revision"])

    async def list_deployments(self, model: str, page_size: int, page_token: str) -> Page[Deployment]:
        cursor = PageCursor(
            page_size, page_token, json.dumps(["deployments", model]), max_page_size=MAX_PAGE_SIZE
        )
        rows = await self._all(
            "SELECT * FROM deployments WHERE model = %(model)s"
            " AND (%(after)s::text IS NULL OR name > %(after)s) ORDER BY name LIMIT %(limit)s",
            {"model": model, "after": cursor.after, "limit": cursor.limit + 1},
        )
        if not rows and cursor.after is None:
            await self.get_model(model)
        page, token = cursor.page(rows, "name")
        return Page([deployment_from_row(row) for row in page], token)

    async def load_route(self, model: str) -> Versioned[Route | None]:
        """The model's route now (None when nothing is deployed) and the revision it is at."""
        row = await self._one(ROUTE_OF_MODEL, {"model": model})
        assert row is not None  # registry_revision always has its row
        return Versioned(routes_from_row(row, self.min_ready_share).get(model), row["revision"])

    async def load_routes(self) -> Versioned[dict[str, Route]]:
        """The whole route table and the revision it is at."""
        row = await self._one(ALL_ROUTES, {})
        assert row is not None
        return Versioned(routes_from_row(row, self.min_ready_share), row["revision"])

    async def changes(self, reconnect_delay: timedelta) -> AsyncIterator[Change | None]:
        """Every committed change, from LISTEN, for as long as the caller iterates.

        Yields None after each (re)connection: changes made while disconnected were missed,
        so the caller reloads what it keeps. Reconnects after `reconnect_delay` on failure.
        """
        async for payload in self.database.notifications(CHANGES_CHANNEL, reconnect_delay):
            yield None if payload is None else change_from_json(payload)


def change_to_json(change: Change, models: Iterable[str] | None = None) -> str:
    return json.dumps(
        {"revision": change.revision, "models": sorted(change.models if models is None else models)}
    )


def change_from_json(payload: str | bytes) -> Change:
    data = json.loads(payload)
    return Change(revision=int(data["revision"]), models=frozenset(data["models"]), keys=frozenset())


class Writer:
    """Reads and writes inside one transaction. Core code records what changed with `touch`."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._models: set[str] = set()
        self._keys: set[str] = set()
        self.change: Change | None = None
        """The committed change; set once the transaction has its revision."""

    def touch(self, models: Iterable[str] = (), keys: Iterable[str] = ()) -> None:
        """Record that routes of `models` may have changed and that cache `keys` are stale."""
        self._models.update(models)
        self._keys.update(keys)

    async def commit_change(self) -> None:
        if not (self._models or self._keys):
            return
        row = await self._one("UPDATE registry_revision SET revision = revision + 1 RETURNING revision", {})
        assert row is not None
        self.change = Change(row["revision"], frozenset(self._models), frozenset(self._keys))
        for chunk in _notify_chunks(sorted(self._models)):
            await self._connection.execute(
                "SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, change_to_json(self.change, chunk))
            )

    async def _one(self, query: LiteralString, params: Mapping[str, Any]) -> DictRow | None:
        cursor = await self._connection.execute(query, params)
        return await cursor.fetchone()

    async def _all(self, query: LiteralString, params: Mapping[str, Any]) -> list[DictRow]:
        cursor = await self._connection.execute(query, params)
        return await cursor.fetchall()

    # Models

    async def get_model(self, name: str, *, lock: bool = False) -> Model:
        """The model; with `lock`, locked until commit. Writes to a model's versions and
        deployments take that lock first, so rules that span rows (deployments route only to
        versions that may be routed to) hold under concurrency."""
        query: LiteralString = (
            "SELECT * FROM models WHERE name = %(name)s FOR UPDATE"
            if lock
            else "SELECT * FROM models WHERE name = %(name)s"
        )
        row = await self._one(query, {"name": name})
        if row is None:
            raise NotFound(MODEL, f"models/{name}")
        return model_from_row(row)

    async def insert_model(self, model: Model) -> Model:
        try:
            row = await self._one(
                "INSERT INTO models (name, description, labels)"
                " VALUES (%(name)s, %(description)s, %(labels)s) RETURNING *",
                {"name": model.name, "description": model.description, "labels": Jsonb(dict(model.labels))},
            )
        except errors.UniqueViolation as exc:
            raise AlreadyExists(MODEL, f"models/{model.name}") from exc
        assert row is not None
        return model_from_row(row)

    async def update_model(self, model: Model, read: Model) -> Model:
        row = await self._one(
            "UPDATE models SET description = %(description)s, labels = %(labels)s, update_time = now(),"
            " row_version = row_version + 1 WHERE name = %(name)s AND row_version = %(read)s"
            " RETURNING *",
            {
                "name": model.name,
                "description": model.description,
                "labels": Jsonb(dict(model.labels)),
                "read": row_version(read.etag),
            },
        )
        if row is None:
            raise Aborted(f"model models/{model.name} changed while it was updated; read it again")
        return model_from_row(row)

    async def delete_model(self, model: Model) -> tuple[list[str], list[str]]:
        """Deletes the model, its versions and deployments; returns the version and deployment ids."""
        versions = await self._all(
            "SELECT version FROM model_versions WHERE model = %(m)s", {"m": model.name}
        )
        deployments = await self._all("SELECT name FROM deployments WHERE model = %(m)s", {"m": model.name})
        row = await self._one(
            "DELETE FROM models WHERE name = %(name)s AND row_version = %(read)s RETURNING name",
            {"name": model.name, "read": row_version(model.etag)},
        )
        if row is None:
            raise Aborted(f"model models/{model.name} changed while it was deleted; read it again")
        return [r["version"] for r in versions], [r["name"] for r in deployments]

    # Versions

    async def get_model_version(self, model: str, version: str) -> ModelVersion:
        versions = await self.model_versions(model, [version])
        if version not in versions:
            raise NotFound(MODEL_VERSION, f"models/{model}/versions/{version}")
        return versions[version]

    async def model_versions(
        self, model: str, versions: Iterable[str] | None = None
    ) -> dict[str, ModelVersion]:
        """The model's versions by id: all of them, or those of `versions` that exist."""
        rows = await self._all(
            "SELECT * FROM model_versions WHERE model = %(model)s"
            " AND (%(versions)s::text[] IS NULL OR version = ANY(%(versions)s)) ORDER BY seq",
            {"model": model, "versions": None if versions is None else list(versions)},
        )
        return {row["version"]: version_from_row(row) for row in rows}

    async def next_version_id(self, model: str) -> str:
        row = await self._one(
            "SELECT coalesce(max(version::bigint) FILTER (WHERE version ~ '^[0-9]{1,18}$'), 0) + 1 AS next"
            " FROM model_versions WHERE model = %(model)s",
            {"model": model},
        )
        assert row is not None
        return str(row["next"])

    async def insert_model_version(self, version: ModelVersion) -> ModelVersion:
        try:
            row = await self._one(
                "INSERT INTO model_versions (model, version, platform, inputs, outputs, max_batch_size,"
                " artifact_uri, stage, metrics) VALUES (%(model)s, %(version)s, %(platform)s, %(inputs)s,"
                " %(outputs)s, %(max_batch_size)s, %(artifact_uri)s, %(stage)s, %(metrics)s)"
                " RETURNING *",
                _version_params(version),
            )
        except errors.UniqueViolation as exc:
            raise AlreadyExists(MODEL_VERSION, f"models/{version.model}/versions/{version.version}") from exc
        assert row is not None
        return version_from_row(row)

    async def update_model_version(self, version: ModelVersion, read: ModelVersion) -> ModelVersion:
        row = await self._one(
            "UPDATE model_versions SET platform = %(platform)s, inputs = %(inputs)s, outputs = %(outputs)s,"
            " max_batch_size = %(max_batch_size)s, artifact_uri = %(artifact_uri)s, stage = %(stage)s,"
            " metrics = %(metrics)s, update_time = now(), row_version = row_version + 1"
            " WHERE model = %(model)s AND version = %(version)s AND row_version = %(read)s"
            " RETURNING *",
            {**_version_params(version), "read": row_version(read.etag)},
        )
        if row is None:
            raise Aborted(
                f"models/{version.model}/versions/{version.version} changed meanwhile; read it again"
            )
        return version_from_row(row)

    async def delete_model_version(self, version: ModelVersion) -> None:
        row = await self._one(
            "DELETE FROM model_versions WHERE model = %(model)s AND version = %(version)s"
            " AND row_version = %(read)s RETURNING version",
            {"model": version.model, "version": version.version, "read": row_version(version.etag)},
        )
        if row is None:
            raise Aborted(
                f"models/{version.model}/versions/{version.version} changed meanwhile; read it again"
            )

    # Pools

    async def get_pool(self, name: str, *, share_lock: bool = False) -> Pool:
        """The pool; with `share_lock`, it cannot change or go away until commit."""
        query: LiteralString = (
            "SELECT * FROM pools WHERE name = %(name)s FOR SHARE"
            if share_lock
            else "SELECT * FROM pools WHERE name = %(name)s"
        )
        row = await self._one(query, {"name": name})
        if row is None:
            raise NotFound(POOL, f"pools/{name}")
        return pool_from_row(row)

    async def models_on_pool(self, pool: str) -> set[str]:
        rows = await self._all("SELECT DISTINCT model FROM deployments WHERE pool = %(pool)s", {"pool": pool})
        return {row["model"] for row in rows}

    async def insert_pool(self, pool: Pool) -> Pool:
        try:
            row = await self._one(
                "INSERT INTO pools (name, endpoints) VALUES (%(name)s, %(endpoints)s) RETURNING *",
                {"name": pool.name, "endpoints": Jsonb(list(pool.endpoints))},
            )
        except errors.UniqueViolation as exc:
            raise AlreadyExists(POOL, f"pools/{pool.name}") from exc
        assert row is not None
        return pool_from_row(row)

    async def update_pool(self, pool: Pool, read: Pool) -> Pool:
        row = await self._one(
            "UPDATE pools SET endpoints = %(endpoints)s, update_time = now(), row_version = row_version + 1"
            " WHERE name = %(name)s AND row_version = %(read)s RETURNING *",
            {"name": pool.name, "endpoints": Jsonb(list(pool.endpoints)), "read": row_version(read.etag)},
        )
        if row is None:
            raise Aborted(f"pools/{pool.name} changed while it was updated; read it again")
        return pool_from_row(row)

    async def replace_model_states(
        self, pool: str, endpoint: str, reports: Sequence[ModelStateReport]
    ) -> set[str]:
        """Make `reports` the whole of what `endpoint` of `pool` reports; returns the models
        whose states changed (a report that changes nothing writes nothing)."""
        await self.get_pool(pool, share_lock=True)
        rows = await self._all(
            "SELECT model, version, triton, state, reason FROM model_version_states"
            " WHERE pool = %(pool)s AND endpoint = %(endpoint)s FOR UPDATE",
            {"pool": pool, "endpoint": endpoint},
        )
        reporter = await self._one(
            "SELECT 1 AS known FROM model_state_reporters WHERE pool = %(pool)s AND endpoint = %(endpoint)s",
            {"pool": pool, "endpoint": endpoint},
        )
        old = {(r["model"], r["version"], r["triton"]): (r["state"], r["reason"]) for r in rows}
        new = {(r.model, r.version, r.triton): (r.state.value, r.reason) for r in reports}
        if reporter is not None and old == new:
            return set()
        await self._connection.execute(
            "INSERT INTO model_state_reporters (pool, endpoint) VALUES (%(pool)s, %(endpoint)s)"
            " ON CONFLICT (pool, endpoint) DO UPDATE SET update_time = now()",
            {"pool": pool, "endpoint": endpoint},
        )
        await self._connection.execute(
            "DELETE FROM model_version_states WHERE pool = %(pool)s AND endpoint = %(endpoint)s",
            {"pool": pool, "endpoint": endpoint},
        )
        for (model, version, triton), (state, reason) in new.items():
            await self._connection.execute(
                "INSERT INTO model_version_states (pool, endpoint, model, version, triton, state, reason)"
                " VALUES (%(pool)s, %(endpoint)s, %(model)s, %(version)s, %(triton)s, %(state)s, %(reason)s)",
                {
                    "pool": pool,
                    "endpoint": endpoint,
                    "model": model,
                    "version": version,
                    "triton": triton,
                    "state": state,
                    "reason": reason,
                },
            )
        if reporter is None:
            # The pool starts reporting: every model it serves is now gated by readiness.
            return set(await self.models_on_pool(pool)) | {key[0] for key in new}
        return {key[0] for key in old.keys() ^ new.keys()} | {
            key[0] for key in old.keys() & new.keys() if old[key] != new[key]
        }

    # Pool members

    async def join_pool(self, pool: str, endpoint: str, lease: timedelta) -> tuple[datetime, bool]:
        """Make `endpoint` a member of `pool` until `lease` from now (the database's clock);
        returns when it expires and whether it joined just now (rather than renewed)."""
        await self.get_pool(pool, share_lock=True)
        renewed = await self._one(
            "UPDATE pool_members SET expire_time = now() + %(lease)s"
            " WHERE pool = %(pool)s AND endpoint = %(endpoint)s RETURNING expire_time",
            {"pool": pool, "endpoint": endpoint, "lease": lease},
        )
        if renewed is not None:
            return renewed["expire_time"], False
        # Two joins of one endpoint at once: the later one renews what the first inserted.
        joined = await self._one(
            "INSERT INTO pool_members (pool, endpoint, expire_time)"
            " VALUES (%(pool)s, %(endpoint)s, now() + %(lease)s)"
            " ON CONFLICT (pool, endpoint) DO UPDATE SET expire_time = EXCLUDED.expire_time"
            " RETURNING expire_time",
            {"pool": pool, "endpoint": endpoint, "lease": lease},
        )
        assert joined is not None
        return joined["expire_time"], True

    async def leave_pool(self, pool: str, endpoint: str) -> bool:
        """Remove `endpoint` from `pool`'s members; returns whether it was one."""
        await self.get_pool(pool)
        row = await self._one(
            "DELETE FROM pool_members WHERE pool = %(pool)s AND endpoint = %(endpoint)s RETURNING pool",
            {"pool": pool, "endpoint": endpoint},
        )
        if row is not None:
            await self._forget_states_of_gone(pool, endpoint)
        return row is not None

    async def expire_pool_members(self) -> list[tuple[str, str]]:
        """Remove every member whose lease has run out; returns them as (pool, endpoint)."""
        rows = await self._all(
            "DELETE FROM pool_members WHERE expire_time < now() RETURNING pool, endpoint", {}
        )
        for row in rows:
            await self._forget_states_of_gone(row["pool"], row["endpoint"])
        return sorted((row["pool"], row["endpoint"]) for row in rows)

    async def _forget_states_of_gone(self, pool: str, endpoint: str) -> None:
        """A member that left no longer counts towards its versions' readiness, unless the pool
        also lists it by hand."""
        await self._connection.execute(
            "DELETE FROM model_state_reporters r USING pools p WHERE p.name = r.pool"
            " AND r.pool = %(pool)s AND r.endpoint = %(endpoint)s AND NOT p.endpoints ? r.endpoint",
            {"pool": pool, "endpoint": endpoint},
        )

    async def delete_pool(self, pool: Pool) -> None:
        try:
            row = await self._one(
                "DELETE FROM pools WHERE name = %(name)s AND row_version = %(read)s RETURNING name",
                {"name": pool.name, "read": row_version(pool.etag)},
            )
        except errors.ForeignKeyViolation as exc:
            raise FailedPrecondition(
                f"pools/{pool.name} serves deployments; delete or move them first"
            ) from exc
        if row is None:
            raise Aborted(f"pools/{pool.name} changed while it was deleted; read it again")

    # Deployments

    async def get_deployment(self, model: str, name: str) -> Deployment:
        row = await self._one(
            "SELECT * FROM deployments WHERE model = %(model)s AND name = %(name)s",
            {"model": model, "name": name},
        )
        if row is None:
            raise NotFound(DEPLOYMENT, f"models/{model}/deployments/{name}")
        return deployment_from_row(row)

    async def deployments_of(self, model: str) -> list[Deployment]:
        rows = await self._all(
            "SELECT * FROM deployments WHERE model = %(model)s ORDER BY name",
            {"model": model},
        )
        return [deployment_from_row(row) for row in rows]

    async def insert_deployment(self, deployment: Deployment) -> Deployment:
        try:
            row = await self._one(
                "INSERT INTO deployments (model, name, pool, traffic, aliases, shadow) VALUES"
                " (%(model)s, %(name)s, %(pool)s, %(traffic)s, %(aliases)s, %(shadow)s)"
                " RETURNING *",
                _deployment_params(deployment),
            )
        except errors.UniqueViolation as exc:
            raise AlreadyExists(
                DEPLOYMENT, f"models/{deployment.model}/deployments/{deployment.name}"
            ) from exc
        assert row is not None
        return deployment_from_row(row)

    async def update_deployment(self, deployment: Deployment, read: Deployment) -> Deployment:
        row = await self._one(
            "UPDATE deployments SET pool = %(pool)s, traffic = %(traffic)s, aliases = %(aliases)s,"
            " shadow = %(shadow)s, update_time = now(), row_version = row_version + 1"
            " WHERE model = %(model)s AND name = %(name)s AND row_version = %(read)s"
            " RETURNING *",
            {**_deployment_params(deployment), "read": row_version(read.etag)},
        )
        if row is None:
            raise Aborted(f"models/{deployment.model}/deployments/{deployment.name} changed meanwhile")
        return deployment_from_row(row)

    async def delete_deployment(self, deployment: Deployment) -> None:
        row = await self._one(
            "DELETE FROM deployments WHERE model = %(model)s AND name = %(name)s AND row_version = %(read)s"
            " RETURNING name",
            {"model": deployment.model, "name": deployment.name, "read": row_version(deployment.etag)},
        )
        if row is None:
            raise Aborted(f"models/{deployment.model}/deployments/{deployment.name} changed meanwhile")


def _notify_chunks(models: Sequence[str]) -> Iterable[Sequence[str]]:
    """The models split so each notification's payload stays under PostgreSQL's limit."""
    chunk: list[str] = []
    size = 0
    for model in models:
        if chunk and size + len(model) + 4 > MAX_NOTIFY_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(model)
        size += len(model) + 4
    yield chunk
