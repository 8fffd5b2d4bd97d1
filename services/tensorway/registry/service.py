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
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from datetime import timedelta
from operator import attrgetter
from typing import Any

from google.protobuf.message import Message
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from tensorway.registry import access, converters
from tensorway.registry.cache import RedisCache
from tensorway.registry.converters import rollout_from_proto, rollout_to_proto, traffic_from_proto
from tensorway.registry.core import Registry, ResolveSource
from tensorway.registry.domain import DEFAULT_MIN_READY_SHARE, Deployment, Pool, Route
from tensorway.registry.membership import MemberSweep
from tensorway.registry.rollout_driver import RolloutDriver
from tensorway.registry.rollout_store import Rollouts
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

    pool_member_sweep_grace: timedelta = timedelta(seconds=10)
    """No sweep for this long after the registry starts or after a sweep fails (PostgreSQL
    away): the members could not renew while it was away, and their leases may have run out
    meanwhile. The orchestrators' default lease; a dead one is removed this much later then."""

    rollout_tick: timedelta = timedelta(seconds=1)
    """How often each replica looks for rollout steps that are due (one replica takes each);
    a step is judged at most this long after its interval ends."""

    @field_validator("pool_endpoint_allow")
    @classmethod
    def _allow_list_parses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        EndpointAllowList.parse(value)  # a bad entry stops the service at start, by name
        return value


@dataclass(frozen=True)
class _Kind:
    """A kind of resource as its common RPCs see it: the collections of its name, how a write
    request holds it (`given`), and how an answer shows it to this caller."""

    collections: tuple[str, ...]
    show: Callable[[RegistryServicer, Any], Message]
    given: Callable[[Any], Any] | None = None
    """The resource a request's message holds, ids from the message's name."""
    child: Callable[[Any, str, str], Any] | None = None
    """The resource a create request's message holds under a parent, given the ids."""


class _Rpc:
    """One RPC of a common shape, made a servicer method by its class attribute's name:
    `core` names the core method it calls ("registry.get_model"), the response type follows
    from the RPC's name."""

    def __init__(self, kind: _Kind, core: str) -> None:
        self.kind = kind
        self.core = attrgetter(core)
        self.response: Callable[..., Message] = Message
        self.field = ""
        """The response's field that holds what the call returned (the first, by the API's shape)."""

    def __set_name__(self, owner: type, name: str) -> None:
        response = getattr(pb, f"{name}Response")
        self.response = response
        self.field = response.DESCRIPTOR.fields[0].name if response.DESCRIPTOR.fields else ""

    def __get__(self, servicer: RegistryServicer | None, owner: type | None = None) -> Any:
        if servicer is None:
            return self  # looked up on the class

        # grpc.aio runs a handler on the event loop only if it is a coroutine function.
        async def method(request: Any, context: Any) -> Message:
            return await self.handle(servicer, request)

        return method

    async def handle(self, servicer: RegistryServicer, request: Any) -> Message:
        raise NotImplementedError


class _Get(_Rpc):
    """Reads one resource by name."""

    async def handle(self, servicer: RegistryServicer, request: Any) -> Message:
        access.require_read()
        return await self.answer(servicer, request)

    async def answer(self, servicer: RegistryServicer, request: Any) -> Message:
        found = await self.core(servicer)(*parse_name(request.name, "name", *self.kind.collections))
        return self.response(**{self.field: self.kind.show(servicer, found)})


class _Move(_Get):
    """Changes one resource by name (pause, resume, abort) and answers with it."""

    async def handle(self, servicer: RegistryServicer, request: Any) -> Message:
        access.require_write()
        return await self.answer(servicer, request)


class _Delete(_Rpc):
    """Deletes one resource by name, over the request's etag."""

    async def handle(self, servicer: RegistryServicer, request: Any) -> Message:
        access.require_write()
        refuse_nul(request)
        await self.core(servicer)(*parse_name(request.name, "name", *self.kind.collections), request.etag)
        return self.response()


class _List(_Rpc):
    """A page of the resources under the parent its collections imply, by the request's filter
    where the RPC takes one."""

    async def handle(self, servicer: RegistryServicer, request: Any) -> Message:
        access.require_read()
        refuse_nul(request)
        parent = self.kind.collections[:-1]
        scope = parse_name(request.parent, "parent", *parent) if parent else ()
        where = (request.filter,) if "filter" in request.DESCRIPTOR.fields_by_name else ()
        page = await self.core(servicer)(*scope, *where, request.page_size, request.page_token)
        items = [self.kind.show(servicer, item) for item in page.items]
        return self.response(**{self.field: items}, next_page_token=page.next_page_token)


class _Create(_Rpc):
    """Creates the resource the request holds."""

    async def handle(self, servicer: RegistryServicer, request: Any) -> Message:
        access.require_write()
        refuse_nul(request)
        assert self.kind.given is not None, "a kind written by a common-shape RPC says how"
        written = await self.write(servicer, self.kind.given(getattr(request, self.field)), request)
        return self.response(**{self.field: self.kind.show(servicer, written)})

    async def write(self, servicer: RegistryServicer, given: Any, request: Any) -> Any:
        return await self.core(servicer)(given)


class _CreateChild(_Rpc):
    """Creates the resource the request holds under its parent, with the id it asks for."""

    async def handle(self, servicer: RegistryServicer, request: Any) -> Message:
        access.require_write()
        refuse_nul(request)
        (parent,) = parse_name(request.parent, "parent", *self.kind.collections[:-1])
        assert self.kind.child is not None, "a kind created under a parent says how"
        field = self.field
        given = self.kind.child(getattr(request, field), parent, getattr(request, f"{field}_id"))
        return self.response(**{field: self.kind.show(servicer, await self.core(servicer)(given))})


class _Update(_Create):
    """Updates the resource the request holds, under the request's field mask."""

    async def write(self, servicer: RegistryServicer, given: Any, request: Any) -> Any:
        return await self.core(servicer)(given, list(request.update_mask.paths))


_MODEL = _Kind(("models",), lambda _, m: converters.model_to_proto(m), converters.model_from_proto)
_VERSION = _Kind(
    ("models", "versions"),
    lambda _, v: converters.model_version_to_proto(v),
    converters.named_model_version_from_proto,
    converters.model_version_from_proto,
)
_POOL = _Kind(("pools",), lambda _, pool: _shown(pool), converters.pool_from_proto)
_DEPLOYMENT = _Kind(
    ("models", "deployments"),
    lambda servicer, deployment: servicer.shown_deployment(deployment),
    converters.named_deployment_from_proto,
    converters.deployment_from_proto,
)
_ROLLOUT = _Kind(("models", "rollouts"), lambda _, rollout: rollout_to_proto(rollout))


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    """RegistryService over gRPC: each method converts, calls the core and converts back. The
    RPCs of a common shape (get, list, create, update, delete) are made from a spec each."""

    def __init__(self, registry: Registry, rollouts: Rollouts) -> None:
        self.registry = registry
        self.rollouts = rollouts
        # ResolveModel is the hot path: a response is built once per route and requested
        # version, and reused until the route table replaces that route object.
        # Callers that may not see addresses get the same answer with the endpoints cleared.
        self._resolved: dict[tuple[str, str, bool], tuple[Route, pb.ResolveModelResponse]] = {}

    # The RPCs of a common shape, one line each, by the kind of resource they serve.
    GetModel = _Get(_MODEL, "registry.get_model")
    ListModels = _List(_MODEL, "registry.list_models")
    CreateModel = _Create(_MODEL, "registry.create_model")
    UpdateModel = _Update(_MODEL, "registry.update_model")
    DeleteModel = _Delete(_MODEL, "registry.delete_model")

    GetModelVersion = _Get(_VERSION, "registry.get_model_version")
    ListModelVersions = _List(_VERSION, "registry.list_model_versions")
    CreateModelVersion = _CreateChild(_VERSION, "registry.create_model_version")
    UpdateModelVersion = _Update(_VERSION, "registry.update_model_version")
    DeleteModelVersion = _Delete(_VERSION, "registry.delete_model_version")

    GetPool = _Get(_POOL, "registry.get_pool")
    ListPools = _List(_POOL, "registry.list_pools")
    CreatePool = _Create(_POOL, "registry.create_pool")
    UpdatePool = _Update(_POOL, "registry.update_pool")
    DeletePool = _Delete(_POOL, "registry.delete_pool")

    GetDeployment = _Get(_DEPLOYMENT, "registry.get_deployment")
    ListDeployments = _List(_DEPLOYMENT, "registry.list_deployments")
    CreateDeployment = _CreateChild(_DEPLOYMENT, "registry.create_deployment")
    UpdateDeployment = _Update(_DEPLOYMENT, "registry.update_deployment")
    DeleteDeployment = _Delete(_DEPLOYMENT, "registry.delete_deployment")

    GetRollout = _Get(_ROLLOUT, "rollouts.get")
    ListRollouts = _List(_ROLLOUT, "rollouts.list")
    PauseRollout = _Move(_ROLLOUT, "rollouts.pause")
    ResumeRollout = _Move(_ROLLOUT, "rollouts.resume")
    AbortRollout = _Move(_ROLLOUT, "rollouts.abort")

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
        moved, demoted = await self.registry.transition_stage(model, version, stage, request.etag)
        return pb.TransitionModelVersionStageResponse(
            model_version=converters.model_version_to_proto(moved),
            demoted_versions=[converters.model_version_to_proto(v) for v in demoted],
        )

    async def ResolveModel(self, request: pb.ResolveModelRequest, context: Any) -> pb.ResolveModelResponse:
        access.require_read()
        (model,) = parse_name(request.name, "name", "models")
        resolution = await self.registry.resolve(model, request.version)
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

    def shown_deployment(self, deployment: Deployment) -> pb.Deployment:
        """The deployment with its versions' readiness, addresses only for who may see them."""
        message = converters.deployment_to_proto(deployment)
        for readiness in self.registry.readiness(deployment):
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
        await self.registry.report_model_states(
            pool, request.endpoint, converters.state_reports_from_proto(request)
        )
        return pb.ReportModelStatesResponse()

    async def JoinPool(self, request: pb.JoinPoolRequest, context: Any) -> pb.JoinPoolResponse:
        access.require_write()
        refuse_nul(request)
        (pool,) = parse_name(request.pool, "pool", "pools")
        expire_time, joined = await self.registry.join_pool(
            pool, request.endpoint, request.lease_duration.ToTimedelta()
        )
        response = pb.JoinPoolResponse(joined=joined)
        response.expire_time.FromDatetime(expire_time)
        return response

    async def LeavePool(self, request: pb.LeavePoolRequest, context: Any) -> pb.LeavePoolResponse:
        access.require_write()
        refuse_nul(request)
        (pool,) = parse_name(request.pool, "pool", "pools")
        await self.registry.leave_pool(pool, request.endpoint)
        return pb.LeavePoolResponse()

    # Measured rollouts (`rollout_domain` has the rule)

    async def StartRollout(self, request: pb.StartRolloutRequest, context: Any) -> pb.StartRolloutResponse:
        access.require_write()
        refuse_nul(request)
        (model,) = parse_name(request.parent, "parent", "models")
        started = await self.rollouts.start(rollout_from_proto(request.rollout, model))
        return pb.StartRolloutResponse(rollout=rollout_to_proto(started))

    async def ReportTraffic(self, request: pb.ReportTrafficRequest, context: Any) -> pb.ReportTrafficResponse:
        access.require_write()
        refuse_nul(request)
        await self.rollouts.report_traffic(request.router, traffic_from_proto(request))
        return pb.ReportTrafficResponse()

    async def WatchRoutes(
        self, request: pb.WatchRoutesRequest, context: Any
    ) -> AsyncIterator[pb.WatchRoutesResponse]:
        access.require_internal()
        raise_if([v for i, m in enumerate(request.models) for v in model_id(m, f"models[{i}]")], "models")
        watcher = self.registry.watch_routes(request.models)
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
        sweep = MemberSweep(registry, settings.pool_member_sweep_interval, settings.pool_member_sweep_grace)
        sweeping.append(asyncio.create_task(sweep.run()))

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
