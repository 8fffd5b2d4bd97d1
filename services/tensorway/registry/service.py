"""The registry service: its settings, the gRPC servicer (convert, call the core, convert) and
`create`, which `tensorway serve registry` runs.

Who may call what (`access` has the whole rule): writes need the `models.write` scope; reads
are open to internal callers and to tokens with `models.read`, but only `models.write` sees
where backends live (pool endpoints, a resolved route's endpoints); WatchRoutes is for the
routers and orchestrators inside the network. Pool endpoints must lie where the
`pool_endpoint_allow` setting lets pools live, and never at link-local or metadata addresses;
so must the orchestrators that join a pool themselves (`membership`), which write as the mesh's
internal identity, as their state reports do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import timedelta
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from tensorway.registry import access, converters
from tensorway.registry.cache import RedisCache
from tensorway.registry.core import Registry, ResolveSource
from tensorway.registry.domain import DEFAULT_MIN_READY_SHARE, Deployment, Pool, Route
from tensorway.registry.membership import MemberSweep
from tensorway.registry.rollouts import (
    RolloutDriver,
    Rollouts,
    rollout_from_proto,
    rollout_to_proto,
    traffic_from_proto,
)
from tensorway.registry.routes import PublishedRoutes, RouteSync
from tensorway.registry.store import RegistryStore
from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.registry.v1 import registry_service_pb2_grpc as pb_grpc
from tensorway.registry.validation import (
    DEFAULT_POOL_ENDPOINT_ALLOW,
    EndpointAllowList,
    model_id,
    parse_name,
    raise_if,
)
from tensorway.runtime import (
    FieldViolation,
    InvalidArgument,
    ServiceBinding,
    ServiceServer,
    ServiceSettings,
    create_server,
)
from tensorway.runtime.requests import refuse_nul

SERVICE = pb.DESCRIPTOR.services_by_name["RegistryService"]
RESOLVED_RESPONSES_KEPT = 10_000


class Settings(ServiceSettings):
    """The registry's settings, from TENSORWAY_REGISTRY_* variables."""

    model_config = SettingsConfigDict(env_prefix="TENSORWAY_REGISTRY_", extra="ignore")

    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/tensorway"
    """PostgreSQL, the registry's truth."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis, the cache and the change channel between replicas."""
    postgres_pool_size: int = 10
    """Most connections to PostgreSQL at once."""
    postgres_timeout: timedelta = timedelta(seconds=2)
    """How long a call waits for a PostgreSQL connection before it fails UNAVAILABLE."""
    redis_timeout: timedelta = timedelta(milliseconds=250)
    """How long a Redis call may take before the read goes to PostgreSQL instead."""
    redis_outage_backoff: timedelta = timedelta(seconds=1)
    """After a Redis failure, how long to leave Redis alone before trying it again."""
    cache_ttl: timedelta = timedelta(minutes=10)
    """How long Redis keeps a cached value; bounds staleness if an invalidation is ever lost."""
    reconnect_delay: timedelta = timedelta(milliseconds=200)
    """Pause before the change feeds reconnect to PostgreSQL or Redis."""
    retry_after: timedelta = timedelta(seconds=1)
    """The RetryInfo delay sent with UNAVAILABLE when PostgreSQL is down."""
    resolve_from: ResolveSource = ResolveSource.MEMORY
    """Where ResolveModel reads routes: memory (the in-process table), redis or postgres."""
    pool_endpoint_allow: tuple[str, ...] = DEFAULT_POOL_ENDPOINT_ALLOW
    """Where pool endpoints may point: CIDRs ("10.0.0.0/8", "::1/128") and host patterns
    ("*.svc.cluster.local", "orchestrator"), as a JSON list in the environment. The default
    admits loopback and Kubernetes service names. Link-local and cloud metadata addresses are
    refused whatever this says."""

    min_ready_share: float = Field(DEFAULT_MIN_READY_SHARE, ge=0.0, le=1.0)
    """Share of a pool's endpoints (orchestrators) that must report a version ready before its
    route gives it traffic by weight; whatever the share, at least one. Until then its share
    goes to the versions that can serve. Pools whose orchestrators report no states are
    routed as they are."""

    pool_member_sweep_interval: timedelta = timedelta(seconds=1)
    """How often expired pool members are removed: a dead orchestrator's lease plus this long
    bounds how long routers are still sent to it. Each sweep is one indexed DELETE."""

    rollout_tick: timedelta = timedelta(seconds=1)
    """How often each replica looks for rollout steps that are due (one replica takes each);
    a step is judged at most this long after its interval ends."""

    @field_validator("pool_endpoint_allow")
    @classmethod
    def _allow_list_parses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        EndpointAllowList.parse(value)  # a bad entry stops the service at start, by name
        return value


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    """RegistryService over gRPC: each method converts, calls the core and converts back."""

    def __init__(self, registry: Registry, rollouts: Rollouts) -> None:
        self._registry = registry
        self._rollouts = rollouts
        # ResolveModel is the hot path: a response is built once per route and requested
        # version, and reused until the route table replaces that route object.
        # Callers that may not see addresses get the same answer with the endpoints cleared.
        self._resolved: dict[tuple[str, str, bool], tuple[Route, pb.ResolveModelResponse]] = {}

    async def CreateModel(self, request: pb.CreateModelRequest, context: Any) -> pb.CreateModelResponse:
        access.require_write()
        refuse_nul(request)
        model = await self._registry.create_model(converters.model_from_proto(request.model))
        return pb.CreateModelResponse(model=converters.model_to_proto(model))

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.GetModelResponse:
        access.require_read()
        (model,) = parse_name(request.name, "name", "models")
        return pb.GetModelResponse(model=converters.model_to_proto(await self._registry.get_model(model)))

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        access.require_read()
        refuse_nul(request)
        page = await self._registry.list_models(request.filter, request.page_size, request.page_token)
        return pb.ListModelsResponse(
            models=[converters.model_to_proto(m) for m in page.items], next_page_token=page.next_page_token
        )

    async def UpdateModel(self, request: pb.UpdateModelRequest, context: Any) -> pb.UpdateModelResponse:
        access.require_write()
        refuse_nul(request)
        model = converters.model_from_proto(request.model)
        updated = await self._registry.update_model(model, list(request.update_mask.paths))
        return pb.UpdateModelResponse(model=converters.model_to_proto(updated))

    async def DeleteModel(self, request: pb.DeleteModelRequest, context: Any) -> pb.DeleteModelResponse:
        access.require_write()
        refuse_nul(request)
        (model,) = parse_name(request.name, "name", "models")
        await self._registry.delete_model(model, request.etag)
        return pb.DeleteModelResponse()

    async def CreateModelVersion(
        self, request: pb.CreateModelVersionRequest, context: Any
    ) -> pb.CreateModelVersionResponse:
        access.require_write()
        refuse_nul(request)
        (model,) = parse_name(request.parent, "parent", "models")
        version = converters.model_version_from_proto(request.model_version, model, request.model_version_id)
        created = await self._registry.create_model_version(model, request.model_version_id, version)
        return pb.CreateModelVersionResponse(model_version=converters.model_version_to_proto(created))

    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: Any
    ) -> pb.GetModelVersionResponse:
        access.require_read()
        model, version = parse_name(request.name, "name", "models", "versions")
        found = await self._registry.get_model_version(model, version)
        return pb.GetModelVersionResponse(model_version=converters.model_version_to_proto(found))

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: Any
    ) -> pb.ListModelVersionsResponse:
        access.require_read()
        refuse_nul(request)
        (model,) = parse_name(request.parent, "parent", "models")
        page = await self._registry.list_model_versions(
            model, request.filter, request.page_size, request.page_token
        )
        return pb.ListModelVersionsResponse(
            model_versions=[converters.model_version_to_proto(v) for v in page.items],
            next_page_token=page.next_page_token,
        )

    async def UpdateModelVersion(
        self, request: pb.UpdateModelVersionRequest, context: Any
    ) -> pb.UpdateModelVersionResponse:
        access.require_write()
        refuse_nul(request)
        model, version = parse_name(request.model_version.name, "model_version.name", "models", "versions")
        given = converters.model_version_from_proto(request.model_version, model, version)
        updated = await self._registry.update_model_version(given, list(request.update_mask.paths))
        return pb.UpdateModelVersionResponse(model_version=converters.model_version_to_proto(updated))

    async def DeleteModelVersion(
        self, request: pb.DeleteModelVersionRequest, context: Any
    ) -> pb.DeleteModelVersionResponse:
        access.require_write()
        refuse_nul(request)
        model, version = parse_name(request.name, "name", "models", "versions")
        await self._registry.delete_model_version(model, version, request.etag)
        return pb.DeleteModelVersionResponse()

    async def TransitionModelVersionStage(
        self, request: pb.TransitionModelVersionStageRequest, context: Any
    ) -> pb.TransitionModelVersionStageResponse:
        access.require_write()
        refuse_nul(request)
        model, version = parse_name(request.name, "name", "models", "versions")
        stage = converters.stage_from_proto(request.stage)
        if stage is None:
            raise InvalidArgument(
                "stage is required", [FieldViolation("stage", "DRAFT, STAGING, PRODUCTION or ARCHIVED")]
            )
        moved, demoted = await self._registry.transition_stage(model, version, stage, request.etag)
        return pb.TransitionModelVersionStageResponse(
            model_version=converters.model_version_to_proto(moved),
            demoted_versions=[converters.model_version_to_proto(v) for v in demoted],
        )

    async def CreatePool(self, request: pb.CreatePoolRequest, context: Any) -> pb.CreatePoolResponse:
        access.require_write()
        refuse_nul(request)
        pool = await self._registry.create_pool(converters.pool_from_proto(request.pool))
        return pb.CreatePoolResponse(pool=converters.pool_to_proto(pool))

    async def GetPool(self, request: pb.GetPoolRequest, context: Any) -> pb.GetPoolResponse:
        access.require_read()
        (pool,) = parse_name(request.name, "name", "pools")
        return pb.GetPoolResponse(pool=_shown(await self._registry.get_pool(pool)))

    async def ListPools(self, request: pb.ListPoolsRequest, context: Any) -> pb.ListPoolsResponse:
        access.require_read()
        refuse_nul(request)
        page = await self._registry.list_pools(request.page_size, request.page_token)
        return pb.ListPoolsResponse(
            pools=[_shown(p) for p in page.items], next_page_token=page.next_page_token
        )

    async def UpdatePool(self, request: pb.UpdatePoolRequest, context: Any) -> pb.UpdatePoolResponse:
        access.require_write()
        refuse_nul(request)
        pool = converters.pool_from_proto(request.pool)
        updated = await self._registry.update_pool(pool, list(request.update_mask.paths))
        return pb.UpdatePoolResponse(pool=converters.pool_to_proto(updated))

    async def DeletePool(self, request: pb.DeletePoolRequest, context: Any) -> pb.DeletePoolResponse:
        access.require_write()
        refuse_nul(request)
        (pool,) = parse_name(request.name, "name", "pools")
        await self._registry.delete_pool(pool, request.etag)
        return pb.DeletePoolResponse()

    async def CreateDeployment(
        self, request: pb.CreateDeploymentRequest, context: Any
    ) -> pb.CreateDeploymentResponse:
        access.require_write()
        refuse_nul(request)
        (model,) = parse_name(request.parent, "parent", "models")
        deployment = converters.deployment_from_proto(request.deployment, model, request.deployment_id)
        created = await self._registry.create_deployment(deployment)
        return pb.CreateDeploymentResponse(deployment=self._shown_deployment(created))

    async def GetDeployment(self, request: pb.GetDeploymentRequest, context: Any) -> pb.GetDeploymentResponse:
        access.require_read()
        model, name = parse_name(request.name, "name", "models", "deployments")
        found = await self._registry.get_deployment(model, name)
        return pb.GetDeploymentResponse(deployment=self._shown_deployment(found))

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: Any
    ) -> pb.ListDeploymentsResponse:
        access.require_read()
        refuse_nul(request)
        (model,) = parse_name(request.parent, "parent", "models")
        page = await self._registry.list_deployments(model, request.page_size, request.page_token)
        return pb.ListDeploymentsResponse(
            deployments=[self._shown_deployment(d) for d in page.items],
            next_page_token=page.next_page_token,
        )

    async def UpdateDeployment(
        self, request: pb.UpdateDeploymentRequest, context: Any
    ) -> pb.UpdateDeploymentResponse:
        access.require_write()
        refuse_nul(request)
        model, name = parse_name(request.deployment.name, "deployment.name", "models", "deployments")
        given = converters.deployment_from_proto(request.deployment, model, name)
        updated = await self._registry.update_deployment(given, list(request.update_mask.paths))
        return pb.UpdateDeploymentResponse(deployment=self._shown_deployment(updated))

    async def DeleteDeployment(
        self, request: pb.DeleteDeploymentRequest, context: Any
    ) -> pb.DeleteDeploymentResponse:
        access.require_write()
        refuse_nul(request)
        model, name = parse_name(request.name, "name", "models", "deployments")
        await self._registry.delete_deployment(model, name, request.etag)
        return pb.DeleteDeploymentResponse()

    async def ResolveModel(self, request: pb.ResolveModelRequest, context: Any) -> pb.ResolveModelResponse:
        access.require_read()
        (model,) = parse_name(request.name, "name", "models")
        resolution = await self._registry.resolve(model, request.version)
        shows_addresses = access.shows_addresses()
        key = (model, request.version, shows_addresses)
        built = self._resolved.get(key)
        if built is None or built[0] is not resolution.route:
            response = pb.ResolveModelResponse(
                route=converters.route_to_proto(resolution.route), version=resolution.version
            )
            if not shows_addresses:
                for version in response.route.versions:
                    del version.endpoints[:]
                    _hide_addresses(version.readiness)
            if len(self._resolved) >= RESOLVED_RESPONSES_KEPT:
                self._resolved.clear()  # entries of deleted models would otherwise pile up
            built = self._resolved[key] = (resolution.route, response)
        return built[1]

    def _shown_deployment(self, deployment: Deployment) -> pb.Deployment:
        """The deployment with its versions' readiness, addresses only for who may see them."""
        message = converters.deployment_to_proto(deployment)
        for readiness in self._registry.readiness(deployment):
            shown = message.readiness.add()
            shown.CopyFrom(converters.readiness_to_proto(readiness))
            if not access.shows_addresses():
                _hide_addresses(shown)
        return message

    async def ReportModelStates(
        self, request: pb.ReportModelStatesRequest, context: Any
    ) -> pb.ReportModelStatesResponse:
        access.require_write()
        (pool,) = parse_name(request.pool, "pool", "pools")
        await self._registry.report_model_states(
            pool, request.endpoint, converters.state_reports_from_proto(request)
        )
        return pb.ReportModelStatesResponse()

    async def JoinPool(self, request: pb.JoinPoolRequest, context: Any) -> pb.JoinPoolResponse:
        access.require_write()
        refuse_nul(request)
        (pool,) = parse_name(request.pool, "pool", "pools")
        expire_time = await self._registry.join_pool(
            pool, request.endpoint, request.lease_duration.ToTimedelta()
        )
        response = pb.JoinPoolResponse()
        response.expire_time.FromDatetime(expire_time)
        return response

    async def LeavePool(self, request: pb.LeavePoolRequest, context: Any) -> pb.LeavePoolResponse:
        access.require_write()
        refuse_nul(request)
        (pool,) = parse_name(request.pool, "pool", "pools")
        await self._registry.leave_pool(pool, request.endpoint)
        return pb.LeavePoolResponse()

    # Measured rollouts (`rollouts` has the rule)

    async def StartRollout(self, request: pb.StartRolloutRequest, context: Any) -> pb.StartRolloutResponse:
        access.require_write()
        refuse_nul(request)
        (model,) = parse_name(request.parent, "parent", "models")
        started = await self._rollouts.start(rollout_from_proto(request.rollout, model))
        return pb.StartRolloutResponse(rollout=rollout_to_proto(started))

    async def GetRollout(self, request: pb.GetRolloutRequest, context: Any) -> pb.GetRolloutResponse:
        access.require_read()
        model, rollout = parse_name(request.name, "name", "models", "rollouts")
        return pb.GetRolloutResponse(rollout=rollout_to_proto(await self._rollouts.get(model, rollout)))

    async def ListRollouts(self, request: pb.ListRolloutsRequest, context: Any) -> pb.ListRolloutsResponse:
        access.require_read()
        refuse_nul(request)
        (model,) = parse_name(request.parent, "parent", "models")
        page = await self._rollouts.list(model, request.page_size, request.page_token)
        return pb.ListRolloutsResponse(
            rollouts=[rollout_to_proto(r) for r in page.items], next_page_token=page.next_page_token
        )

    async def PauseRollout(self, request: pb.PauseRolloutRequest, context: Any) -> pb.PauseRolloutResponse:
        access.require_write()
        model, rollout = parse_name(request.name, "name", "models", "rollouts")
        return pb.PauseRolloutResponse(rollout=rollout_to_proto(await self._rollouts.pause(model, rollout)))

    async def ResumeRollout(self, request: pb.ResumeRolloutRequest, context: Any) -> pb.ResumeRolloutResponse:
        access.require_write()
        model, rollout = parse_name(request.name, "name", "models", "rollouts")
        return pb.ResumeRolloutResponse(rollout=rollout_to_proto(await self._rollouts.resume(model, rollout)))

    async def AbortRollout(self, request: pb.AbortRolloutRequest, context: Any) -> pb.AbortRolloutResponse:
        access.require_write()
        model, rollout = parse_name(request.name, "name", "models", "rollouts")
        return pb.AbortRolloutResponse(rollout=rollout_to_proto(await self._rollouts.abort(model, rollout)))

    async def ReportTraffic(self, request: pb.ReportTrafficRequest, context: Any) -> pb.ReportTrafficResponse:
        access.require_write()
        refuse_nul(request)
        await self._rollouts.report_traffic(request.router, traffic_from_proto(request))
        return pb.ReportTrafficResponse()

    async def WatchRoutes(
        self, request: pb.WatchRoutesRequest, context: Any
    ) -> AsyncIterator[pb.WatchRoutesResponse]:
        access.require_internal()
        raise_if([v for i, m in enumerate(request.models) for v in model_id(m, f"models[{i}]")], "models")
        watcher = self._registry.watch_routes(request.models)
        try:
            while True:
                yield converters.route_update_to_proto(await watcher.next())
        finally:
            watcher.close()


def _hide_addresses(readiness: pb.VersionReadiness) -> None:
    for report in readiness.tritons:
        report.endpoint = ""
        report.triton = ""


def _shown(pool: Pool) -> pb.Pool:
    """The pool as the caller may see it: without its endpoints unless it may write the registry."""
    return converters.pool_to_proto(pool if access.shows_addresses() else replace(pool, endpoints=()))


async def open_registry(settings: Settings) -> Registry:
    """Connect to PostgreSQL (migrating it) and Redis, and load the route table."""
    store = await RegistryStore.open(
        settings.postgres_url,
        pool_size=settings.postgres_pool_size,
        wait=settings.postgres_timeout,
        retry_after=settings.retry_after,
        min_ready_share=settings.min_ready_share,
    )
    cache = RedisCache.connect(
        settings.redis_url,
        timeout=settings.redis_timeout,
        ttl=settings.cache_ttl,
        outage_backoff=settings.redis_outage_backoff,
    )
    sync = RouteSync(PublishedRoutes(), store, cache, settings.reconnect_delay)
    registry = Registry(
        store, cache, sync, settings.resolve_from, EndpointAllowList.parse(settings.pool_endpoint_allow)
    )
    try:
        await sync.start()
    except BaseException:
        await registry.close()
        raise
    return registry


async def create(settings: Settings) -> tuple[ServiceServer, int]:
    """The registry server, not yet started, and its port."""
    # What is opened before the server exists is closed again if a later step fails.
    async with AsyncExitStack() as opened:
        registry = await open_registry(settings)
        opened.push_async_callback(registry.close)
        rollouts = await Rollouts.open(
            settings.postgres_url, registry, wait=settings.postgres_timeout, retry_after=settings.retry_after
        )
        opened.push_async_callback(rollouts.close)
        server, port = create_server(
            "registry",
            settings,
            [
                ServiceBinding(
                    pb_grpc.add_RegistryServiceServicer_to_server,
                    RegistryServicer(registry, rollouts),
                    SERVICE,
                )
            ],
        )
        opened.pop_all()
    server.on_stop(registry.close)
    server.on_stop(rollouts.close)
    server.on_start(lambda: _start_rollout_driver(rollouts, settings.rollout_tick, server))
    sweeping: list[asyncio.Task[None]] = []

    async def start_sweep() -> None:
        # Stopped before the registry closes (cleanups run last added first).
        sweeping.append(asyncio.create_task(MemberSweep(registry, settings.pool_member_sweep_interval).run()))

    async def stop_sweep() -> None:
        for task in sweeping:
            task.cancel()
        await asyncio.gather(*sweeping, return_exceptions=True)

    server.on_start(start_sweep)
    server.on_stop(stop_sweep)
    return server, port


async def _start_rollout_driver(rollouts: Rollouts, tick: timedelta, server: ServiceServer) -> None:
    """Every replica drives rollouts; each due step is taken by one of them."""
    driving = asyncio.create_task(RolloutDriver(rollouts, tick).run())

    async def stop_driving() -> None:
        driving.cancel()
        await asyncio.gather(driving, return_exceptions=True)

    # Registered on start, so it runs before the clean-ups registered at creation.
    server.on_stop(stop_driving)
