"""The registry's logic on domain objects: validation, the stage and routing rules, reads
through the cache, writes in one transaction each, and resolving a model to its route.

After a write commits, its cache keys are tombstoned, its change is published to the other
replicas, and this replica's route table catches up before the call returns, so a caller
that resolves right after a write sees it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import Counter

from tensorway.common.v1 import error_pb2
from tensorway.registry import membership, validation
from tensorway.registry.cache import (
    CACHE_LOOKUPS,
    RedisCache,
    SingleFlight,
    deployment_key,
    model_key,
    model_version_key,
    pool_key,
    route_key,
)
from tensorway.registry.converters import (
    DEPLOYMENT_CODEC,
    MODEL_CODEC,
    MODEL_VERSION_CODEC,
    POOL_CODEC,
    Codec,
)
from tensorway.registry.domain import (
    MODEL,
    MODEL_VERSION,
    PRODUCTION_ALIAS,
    Change,
    Deployment,
    Model,
    ModelStateReport,
    ModelVersion,
    Page,
    Pool,
    Resolution,
    Route,
    Stage,
    Versioned,
    VersionReadiness,
)
from tensorway.registry.routes import RouteSubscription, RouteSync
from tensorway.registry.store import RegistryStore, Writer
from tensorway.runtime import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    TensorwayError,
)

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")

STALE_ANSWERS = Counter(
    "tensorway_registry_stale_answers_total",
    "Reads and resolves answered from a cache while PostgreSQL was unreachable.",
    ["kind"],
)

# Where a stage may go next. ARCHIVED is also subject to "no deployment routes to it".
STAGE_TRANSITIONS = {
    Stage.DRAFT: {Stage.STAGING, Stage.ARCHIVED},
    Stage.STAGING: {Stage.PRODUCTION, Stage.DRAFT, Stage.ARCHIVED},
    Stage.PRODUCTION: {Stage.STAGING, Stage.ARCHIVED},
    Stage.ARCHIVED: {Stage.STAGING},
}
INITIAL_STAGES = {Stage.DRAFT, Stage.STAGING}


class ResolveSource(enum.Enum):
    """Where ResolveModel reads routes: the in-memory table (the fast path), or through Redis,
    or PostgreSQL on every call. The last two exist to measure what each tier saves."""

    MEMORY = "memory"
    REDIS = "redis"
    POSTGRES = "postgres"


def check_etag(current_etag: str, given: str, name: str) -> None:
    """A caller that sends an etag writes only over the version it read."""
    if given and given != current_etag:
        raise Aborted(
            f"{name} changed since it was read (etag {given!r}, now {current_etag!r}); read it again"
        )


def choose_version(route: Route, requested: str) -> str:
    """The version a request goes to: the one named, an alias's target, or the heaviest weight."""
    if not requested:
        return max(route.versions, key=lambda candidate: candidate.weight).version
    if any(candidate.version == requested for candidate in route.versions):
        return requested
    target = route.aliases.get(requested)
    if target is not None:
        return target
    raise NotFound(
        MODEL_VERSION,
        f"models/{route.model}/versions/{requested}",
        f"model {route.model!r} routes no version or alias {requested!r}",
        reason=error_pb2.ERROR_REASON_MODEL_NOT_FOUND,
    )


def _routed_by(deployments: Iterable[Deployment], version: str) -> list[str]:
    return [d.name for d in deployments if version in d.referenced_versions()]


def _apply_mask(current: D, update: D, fields: Iterable[str]) -> D:
    """`current` with the masked fields taken from `update`."""
    return replace(current, **{field: getattr(update, field) for field in fields})


class Registry:
    """Models, versions, pools and deployments, and the routes they make."""

    def __init__(
        self,
        store: RegistryStore,
        cache: RedisCache,
        sync: RouteSync,
        resolve_from: ResolveSource,
        endpoint_allow: validation.EndpointAllowList = validation.DEFAULT_ENDPOINT_ALLOW_LIST,
    ) -> None:
        self._store = store
        self._endpoint_allow = endpoint_allow
        self._cache = cache
        self._sync = sync
        self._resolve_from = resolve_from
        self._flights: SingleFlight[str, Versioned[Any]] = SingleFlight()

    async def close(self) -> None:
        await self._sync.stop()
        await self._cache.close()
        await self._store.close()

    async def _read(
        self, kind: str, key: str, load: Callable[[], Awaitable[Versioned[T]]], codec: Codec[T]
    ) -> T:
        """Cache-aside: Redis, else one PostgreSQL load per key that refills Redis."""
        cached = await self._cache.get(key)
        if cached is not None:
            CACHE_LOOKUPS.labels(kind, "redis").inc()
            if not self._store.database.reachable:
                STALE_ANSWERS.labels(kind).inc()
            return codec.decode(cached.payload)

        async def fill() -> Versioned[T]:
            CACHE_LOOKUPS.labels(kind, "postgres").inc()
            loaded = await load()
            await self._cache.put(key, loaded.revision, codec.encode(loaded.value))
            return loaded

        read: Versioned[T] = await self._flights.do(key, fill)
        return read.value

    async def _committed(self, change: Change | None) -> None:
        if change is None:
            return
        await self._cache.invalidate(change)
        await self._cache.publish(change)
        try:
            await self._sync.refresh(change)
        except TensorwayError:
            # The write is committed; the table catches up on the next change or resync.
            logger.warning("route table refresh after a write failed", exc_info=True)

    # Models

    async def create_model(self, model: Model) -> Model:
        validation.check_model(model)
        async with self._store.write() as tx:
            created = await tx.insert_model(model)
            tx.touch(keys=[model_key(model.name)])
        await self._committed(tx.change)
        return created

    async def get_model(self, name: str) -> Model:
        return await self._read("model", model_key(name), lambda: self._store.get_model(name), MODEL_CODEC)

    async def list_models(self, filter_text: str, page_size: int, page_token: str) -> Page[Model]:
        return await self._store.list_models(
            validation.parse_model_filter(filter_text), page_size, page_token
        )

    async def update_model(self, model: Model, mask: Sequence[str]) -> Model:
        fields = validation.check_mask(mask, validation.MODEL_MASK_FIELDS)
        async with self._store.write() as tx:
            current = await tx.get_model(model.name)
            check_etag(current.etag, model.etag, f"models/{model.name}")
            updated = _apply_mask(current, model, fields)
            validation.check_model(updated)
            saved = await tx.update_model(updated, current)
            tx.touch(keys=[model_key(model.name)])
        await self._committed(tx.change)
        return saved

    async def delete_model(self, name: str, etag: str) -> None:
        async with self._store.write() as tx:
            current = await tx.get_model(name, lock=True)
            check_etag(current.etag, etag, f"models/{name}")
            versions, deployments = await tx.delete_model(current)
            tx.touch(
                models=[name],
                keys=[
                    model_key(name),
                    route_key(name),
                    *(model_version_key(name, version) for version in versions),
                    *(deployment_key(name, deployment) for deployment in deployments),
                ],
            )
        await self._committed(tx.change)

    # Versions

    async def create_model_version(self, version: ModelVersion) -> ModelVersion:
        """Create `version`; with no version id, the model's next number is its id."""
        model, version_id = version.model, version.version
        if version_id:
            validation.raise_if(validation.dns_label(version_id, "model_version_id"), "model_version_id")
        validation.check_model_version(version)
        if version.stage not in INITIAL_STAGES:
            raise InvalidArgument(
                "a version starts in DRAFT or STAGING",
                [
                    FieldViolation(
                        "model_version.stage", "DRAFT or STAGING; promote with TransitionModelVersionStage"
                    )
                ],
            )
        async with self._store.write() as tx:
            await tx.get_model(model, lock=True)
            new_id = version_id or await tx.next_version_id(model)
            created = await tx.insert_model_version(replace(version, model=model, version=new_id))
            tx.touch(keys=[model_version_key(model, new_id)])
        await self._committed(tx.change)
        return created

    async def get_model_version(self, model: str, version: str) -> ModelVersion:
        return await self._read(
            "model_version",
            model_version_key(model, version),
            lambda: self._store.get_model_version(model, version),
            MODEL_VERSION_CODEC,
        )

    async def list_model_versions(
        self, model: str, filter_text: str, page_size: int, page_token: str
    ) -> Page[ModelVersion]:
        where = validation.parse_model_version_filter(filter_text)
        return await self._store.list_model_versions(model, where, page_size, page_token)

    async def update_model_version(self, version: ModelVersion, mask: Sequence[str]) -> ModelVersion:
        if "stage" in mask:
            raise InvalidArgument(
                "stage changes follow rules",
                [FieldViolation("update_mask", "use TransitionModelVersionStage for stage")],
            )
        fields = validation.check_mask(mask, validation.VERSION_MASK_FIELDS)
        name = f"models/{version.model}/versions/{version.version}"
        async with self._store.write() as tx:
            await tx.get_model(version.model, lock=True)
            current = await tx.get_model_version(version.model, version.version)
            check_etag(current.etag, version.etag, name)
            frozen = sorted(fields & validation.VERSION_DRAFT_ONLY_FIELDS)
            if frozen and current.stage is not Stage.DRAFT:
                raise FailedPrecondition(
                    f"{name} is {current.stage.value}: {', '.join(frozen)} change only in DRAFT;"
                    " register a new version"
                )
            updated = _apply_mask(current, version, fields)
            validation.check_model_version(updated)
            saved = await tx.update_model_version(updated, current)
            tx.touch(keys=[model_version_key(version.model, version.version)])
            if frozen:
                # A DRAFT version may be deployed, and its signature is part of the route.
                tx.touch(models=[version.model], keys=[route_key(version.model)])
        await self._committed(tx.change)
        return saved

    async def delete_model_version(self, model: str, version: str, etag: str) -> None:
        name = f"models/{model}/versions/{version}"
        async with self._store.write() as tx:
            await tx.get_model(model, lock=True)
            current = await tx.get_model_version(model, version)
            check_etag(current.etag, etag, name)
            routing = _routed_by(await tx.deployments_of(model), version)
            if routing:
                raise FailedPrecondition(
                    f"{name} is routed by deployments {', '.join(routing)}; change them first"
                )
            await tx.delete_model_version(current)
            tx.touch(keys=[model_version_key(model, version)])
        await self._committed(tx.change)

    async def transition_stage(
        self, model: str, version: str, stage: Stage, etag: str
    ) -> tuple[ModelVersion, list[ModelVersion]]:
        """Move a version to `stage` under the stage rules; returns it and the versions its
        promotion demoted from PRODUCTION to STAGING."""
        name = f"models/{model}/versions/{version}"
        async with self._store.write() as tx:
            await tx.get_model(model, lock=True)
            versions = await tx.model_versions(model)
            current = versions.get(version)
            if current is None:
                raise NotFound(MODEL_VERSION, name)
            check_etag(current.etag, etag, name)
            if stage is current.stage:
                return current, []
            if stage not in STAGE_TRANSITIONS[current.stage]:
                allowed = ", ".join(sorted(s.value for s in STAGE_TRANSITIONS[current.stage]))
                raise FailedPrecondition(f"{name} is {current.stage.value}; it can go to {allowed}")
            deployments = await tx.deployments_of(model)
            self._check_leaving_stage(name, current, stage, deployments)
            moved = await tx.update_model_version(replace(current, stage=stage), current)
            demoted = []
            if stage is Stage.PRODUCTION:
                # One PRODUCTION version per model, unless deployments still route to the others
                # (a rollout splitting traffic between them).
                for other in versions.values():
                    if other.stage is Stage.PRODUCTION and not _routed_by(deployments, other.version):
                        demoted.append(
                            await tx.update_model_version(replace(other, stage=Stage.STAGING), other)
                        )
            tx.touch(keys=[model_version_key(model, v.version) for v in (moved, *demoted)])
        await self._committed(tx.change)
        return moved, demoted

    @staticmethod
    def _check_leaving_stage(
        name: str, current: ModelVersion, stage: Stage, deployments: Sequence[Deployment]
    ) -> None:
        if stage is Stage.ARCHIVED:
            routing = _routed_by(deployments, current.version)
            if routing:
                raise FailedPrecondition(
                    f"{name} is routed by deployments {', '.join(routing)}; it cannot be archived"
                )
        if current.stage is Stage.PRODUCTION:
            aliased = [d.name for d in deployments if d.aliases.get(PRODUCTION_ALIAS) == current.version]
            if aliased:
                raise FailedPrecondition(
                    f"the {PRODUCTION_ALIAS!r} alias of deployments {', '.join(aliased)} names {name};"
                    " move it first"
                )

    # Pools

    async def create_pool(self, pool: Pool) -> Pool:
        validation.check_pool(pool, allow=self._endpoint_allow)
        async with self._store.write() as tx:
            created = await tx.insert_pool(pool)
            tx.touch(keys=[pool_key(pool.name)])
        await self._committed(tx.change)
        return created

    async def get_pool(self, name: str) -> Pool:
        return await self._read("pool", pool_key(name), lambda: self._store.get_pool(name), POOL_CODEC)

    async def list_pools(self, page_size: int, page_token: str) -> Page[Pool]:
        return await self._store.list_pools(page_size, page_token)

    async def update_pool(self, pool: Pool, mask: Sequence[str]) -> Pool:
        fields = validation.check_mask(mask, validation.POOL_MASK_FIELDS)
        async with self._store.write() as tx:
            current = await tx.get_pool(pool.name)
            check_etag(current.etag, pool.etag, f"pools/{pool.name}")
            updated = _apply_mask(current, pool, fields)
            validation.check_pool(updated, allow=self._endpoint_allow)
            saved = await tx.update_pool(updated, current)
            served = await tx.models_on_pool(pool.name)
            tx.touch(models=served, keys=[pool_key(pool.name), *(route_key(model) for model in served)])
        await self._committed(tx.change)
        return saved

    async def delete_pool(self, name: str, etag: str) -> None:
        async with self._store.write() as tx:
            current = await tx.get_pool(name)
            check_etag(current.etag, etag, f"pools/{name}")
            await tx.delete_pool(current)
            tx.touch(keys=[pool_key(name)])
        await self._committed(tx.change)

    # Deployments

    async def create_deployment(self, deployment: Deployment) -> Deployment:
        validation.check_deployment(deployment)
        async with self._store.write() as tx:
            await tx.get_model(deployment.model, lock=True)
            await self._check_routable(tx, deployment)
            created = await tx.insert_deployment(deployment)
            self._touch_deployment(tx, deployment)
        await self._committed(tx.change)
        return created

    async def get_deployment(self, model: str, name: str) -> Deployment:
        return await self._read(
            "deployment",
            deployment_key(model, name),
            lambda: self._store.get_deployment(model, name),
            DEPLOYMENT_CODEC,
        )

    async def list_deployments(self, model: str, page_size: int, page_token: str) -> Page[Deployment]:
        return await self._store.list_deployments(model, page_size, page_token)

    async def update_deployment(self, deployment: Deployment, mask: Sequence[str]) -> Deployment:
        fields = validation.check_mask(mask, validation.DEPLOYMENT_MASK_FIELDS)
        async with self._store.write() as tx:
            await tx.get_model(deployment.model, lock=True)
            current = await tx.get_deployment(deployment.model, deployment.name)
            check_etag(
                current.etag, deployment.etag, f"models/{deployment.model}/deployments/{deployment.name}"
            )
            updated = _apply_mask(current, deployment, fields)
            validation.check_deployment(updated)
            await self._check_routable(tx, updated)
            saved = await tx.update_deployment(updated, current)
            self._touch_deployment(tx, deployment)
        await self._committed(tx.change)
        return saved

    async def delete_deployment(self, model: str, name: str, etag: str) -> None:
        async with self._store.write() as tx:
            await tx.get_model(model, lock=True)
            current = await tx.get_deployment(model, name)
            check_etag(current.etag, etag, f"models/{model}/deployments/{name}")
            await tx.delete_deployment(current)
            self._touch_deployment(tx, current)
        await self._committed(tx.change)

    @staticmethod
    def _touch_deployment(tx: Writer, deployment: Deployment) -> None:
        tx.touch(
            models=[deployment.model],
            keys=[deployment_key(deployment.model, deployment.name), route_key(deployment.model)],
        )

    @staticmethod
    async def _check_routable(tx: Writer, deployment: Deployment) -> None:
        """The pool exists, every version it names exists and may be routed to, and it agrees
        with the model's other deployments (they share one route)."""
        await tx.get_pool(deployment.pool, share_lock=True)
        wanted = deployment.referenced_versions()
        versions = await tx.model_versions(deployment.model, wanted)
        for missing in sorted(wanted - versions.keys()):
            raise NotFound(MODEL_VERSION, f"models/{deployment.model}/versions/{missing}")
        archived = sorted(v.version for v in versions.values() if v.stage is Stage.ARCHIVED)
        if archived:
            raise FailedPrecondition(
                f"versions {', '.join(archived)} are ARCHIVED; no deployment may route to them"
            )
        production = deployment.aliases.get(PRODUCTION_ALIAS)
        if production is not None and versions[production].stage is not Stage.PRODUCTION:
            raise FailedPrecondition(
                f"the {PRODUCTION_ALIAS!r} alias names version {production}, which is "
                f"{versions[production].stage.value}; promote it to PRODUCTION first"
            )
        for other in await tx.deployments_of(deployment.model):
            if other.name == deployment.name:
                continue
            for alias, version in other.aliases.items():
                if deployment.aliases.get(alias, version) != version:
                    raise FailedPrecondition(
                        f"alias {alias!r} names version {version} in deployment {other.name};"
                        " one alias, one version"
                    )
            if deployment.shadow is not None and other.shadow is not None:
                raise FailedPrecondition(
                    f"deployment {other.name} already shadows this model; one shadow per model"
                )

    # Readiness

    async def report_model_states(
        self, pool: str, endpoint: str, reports: Sequence[ModelStateReport]
    ) -> None:
        """Record what one orchestrator of `pool` has placed on its Tritons, replacing its last
        report; the routes of the models whose states changed follow."""
        validation.check_model_state_report(endpoint, reports)
        async with self._store.write() as tx:
            changed = await tx.replace_model_states(pool, endpoint, reports)
            tx.touch(models=changed, keys=[route_key(model) for model in changed])
        await self._committed(tx.change)

    def readiness(self, deployment: Deployment) -> list[VersionReadiness]:
        """The readiness on its pool of every version `deployment` routes to, from this
        replica's route table (kept current by every state report)."""
        route = self._sync.table.get(deployment.model)
        if route is None:
            return []
        wanted = deployment.referenced_versions()
        return [
            version.readiness
            for version in route.versions
            if version.pool == deployment.pool and version.version in wanted and version.readiness is not None
        ]

    # Pool membership (`membership` has the rule)

    async def join_pool(self, pool: str, endpoint: str, lease: timedelta) -> tuple[datetime, bool]:
        """Make `endpoint` a member of `pool` for `lease`, or renew it; returns when it expires
        and whether it joined just now. A new member changes the routes of the pool's models; a
        renewal changes nothing."""
        membership.check_member(pool, endpoint, lease, self._endpoint_allow)
        async with self._store.write() as tx:
            expire_time, joined = await tx.join_pool(pool, endpoint, lease)
            if joined:
                self._touch_pool_routes(tx, await tx.models_on_pool(pool))
        await self._committed(tx.change)
        if joined:
            logger.info("pool member joined", extra={"pool": pool, "endpoint": endpoint})
        return expire_time, joined

    async def leave_pool(self, pool: str, endpoint: str) -> None:
        """Remove `endpoint` from `pool`'s members at once; leaving twice is no error."""
        async with self._store.write() as tx:
            left = await tx.leave_pool(pool, endpoint)
            if left:
                self._touch_pool_routes(tx, await tx.models_on_pool(pool))
        await self._committed(tx.change)
        if left:
            logger.info("pool member left", extra={"pool": pool, "endpoint": endpoint})

    async def expire_pool_members(self) -> None:
        """Remove the members whose lease ran out, and change their pools' routes."""
        async with self._store.write() as tx:
            expired = await tx.expire_pool_members()
            for pool in sorted({pool for pool, _ in expired}):
                self._touch_pool_routes(tx, await tx.models_on_pool(pool))
        await self._committed(tx.change)
        for pool, endpoint in expired:
            logger.warning("pool member's lease expired", extra={"pool": pool, "endpoint": endpoint})

    @staticmethod
    def _touch_pool_routes(tx: Writer, models: Iterable[str]) -> None:
        served = sorted(models)
        tx.touch(models=served, keys=[route_key(model) for model in served])

    # Routes

    async def resolve(self, model: str, version: str) -> Resolution:
        route = await self._route(model)
        if route is None:
            raise NotFound(
                MODEL,
                f"models/{model}",
                f"model {model!r} does not exist or is not deployed",
                reason=error_pb2.ERROR_REASON_MODEL_NOT_FOUND,
            )
        return Resolution(route, choose_version(route, version))

    async def _route(self, model: str) -> Route | None:
        if self._resolve_from is ResolveSource.MEMORY:
            if not self._store.database.reachable:
                STALE_ANSWERS.labels("route").inc()
            return self._sync.table.get(model)
        if self._resolve_from is ResolveSource.REDIS:
            return (await self._sync.load_route(model)).value
        return (await self._store.load_route(model)).value

    def watch_routes(self, models: Iterable[str]) -> RouteSubscription:
        """A snapshot of the route table, then every change to it (for the models named, or all)."""
        return self._sync.table.watch(models)
