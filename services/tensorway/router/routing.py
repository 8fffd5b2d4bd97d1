"""The route table the registry pushes, and choosing a model's version from it.

The table is immutable: each change from `WatchRoutes` builds a new one and swaps it in, so a
request sees one consistent table from start to end without locks.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import grpc

from tensorway.common.v1 import error_pb2
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.registry.v1 import registry_service_pb2_grpc as registry_grpc
from tensorway.router import metrics
from tensorway.runtime import NotFound, create_channel

logger = logging.getLogger(__name__)

VersionRoute = registry_pb.VersionRoute
# UNSPECIFIED: the pool's orchestrators report no readiness, so the version is routed as it is.
ROUTABLE_STATES = frozenset(
    {registry_pb.MODEL_VERSION_STATE_UNSPECIFIED, registry_pb.MODEL_VERSION_STATE_READY}
)


def route_key(context: grpc.aio.ServicerContext[Any, Any], header: str) -> str | None:
    """The caller's route key (the value of `header`), if it sent one."""
    for key, value in context.invocation_metadata() or ():
        if key == header and isinstance(value, str):
            return value
    return None


def key_point(route_key: str) -> float:
    """Where a route key falls in [0, 1): stable across processes and restarts, unlike hash()."""
    digest = hashlib.blake2b(route_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class ModelRoute:
    """One model's versions, their traffic weights, aliases and shadow."""

    model: str
    versions: Mapping[str, VersionRoute]
    aliases: Mapping[str, str]
    shadow: registry_pb.ShadowTraffic | None
    # Cumulative weight at the end of each weighted version's range, in the registry's order, so
    # a weight change moves only the keys in the ranges that changed.
    _bounds: tuple[int, ...] = field(repr=False)
    _weighted: tuple[VersionRoute, ...] = field(repr=False)

    @classmethod
    def from_proto(cls, route: registry_pb.Route) -> ModelRoute:
        bounds: list[int] = []
        weighted: list[VersionRoute] = []
        total = 0
        ready = [version for version in route.versions if version.state in ROUTABLE_STATES]
        # A version its pool has not made ready yet (or failed) gets no share by weight: its
        # share goes to the versions that can serve, and when none that has weight can (a
        # cut-over to a version still loading), to the ready ones without weight, equally.
        # Asked for by name, a version runs whatever its readiness.
        shares = [(version, version.weight) for version in ready if version.weight > 0]
        if not shares and len(ready) < len(route.versions):
            shares = [(version, 1) for version in ready]
        for version, weight in shares:
            total += weight
            bounds.append(total)
            weighted.append(version)
        shadow = route.shadow if route.HasField("shadow") and route.shadow.percent > 0 else None
        return cls(
            model=route.model,
            versions={version.version: version for version in route.versions},
            aliases=dict(route.aliases),
            shadow=shadow,
            _bounds=tuple(bounds),
            _weighted=tuple(weighted),
        )

    def choose(self, version: str, route_key: str | None, rng: random.Random) -> VersionRoute:
        """The version to run: the one named, an alias's target, or one by weight.

        By weight, a route key always lands on the same version while the weights stay; without
        a key the choice is random in proportion to the weights.
        """
        if version:
            chosen = self.versions.get(version) or self.versions.get(self.aliases.get(version, ""))
            if chosen is None:
                raise NotFound(
                    "model version", f"{self.model}/{version}", reason=error_pb2.ERROR_REASON_MODEL_NOT_FOUND
                )
            return chosen
        if not self._weighted:
            return self.default()
        point = key_point(route_key) if route_key else rng.random()
        return self._weighted[bisect.bisect_right(self._bounds, point * self._bounds[-1])]

    def default(self) -> VersionRoute:
        """The version that describes the model when none is named: the heaviest weight, the first
        of equals, as the registry's ResolveModel answers."""
        return max(self.versions.values(), key=lambda version: version.weight)

    def shadow_target(self) -> VersionRoute | None:
        """The version that receives copies of this model's traffic, if any."""
        return None if self.shadow is None else self.versions.get(self.shadow.version)


@dataclass(frozen=True)
class RouteTable:
    """Every routed model at one registry revision."""

    revision: int = 0
    models: Mapping[str, ModelRoute] = field(default_factory=dict)

    def model(self, name: str) -> ModelRoute:
        route = self.models.get(name)
        if route is None or not route.versions:
            raise NotFound("model", name, reason=error_pb2.ERROR_REASON_MODEL_NOT_FOUND)
        return route

    def apply(self, update: registry_pb.WatchRoutesResponse) -> RouteTable:
        """The table after a snapshot (which replaces everything) or a delta."""
        models = {} if update.snapshot else dict(self.models)
        for name in update.removed_models:
            models.pop(name, None)
        for route in update.routes:
            models[route.model] = ModelRoute.from_proto(route)
        return RouteTable(revision=update.revision, models=models)

    def endpoints(self) -> set[str]:
        """Every orchestrator address some version routes to."""
        return {
            address
            for route in self.models.values()
            for version in route.versions.values()
            for address in version.endpoints
        }


class RouteSource(Protocol):
    """Where route updates come from: a snapshot, then deltas, until the stream breaks."""

    def watch(self) -> AsyncIterator[registry_pb.WatchRoutesResponse]: ...

    async def close(self) -> None: ...


class RegistryRouteSource:
    """`RegistryService.WatchRoutes` on the registry at `target`."""

    def __init__(self, target: str, models: Iterable[str] = ()) -> None:
        self._channel = create_channel(target)
        self._stub = registry_grpc.RegistryServiceStub(self._channel)
        self._request = registry_pb.WatchRoutesRequest(models=list(models))

    async def watch(self) -> AsyncIterator[registry_pb.WatchRoutesResponse]:
        async for update in self._stub.WatchRoutes(self._request):
            yield update

    async def close(self) -> None:
        await self._channel.close()


TableListener = Callable[[RouteTable], None]


class RouteWatcher:
    """Keeps the route table current from a `RouteSource`, reconnecting when the stream breaks.

    The last table stays in service while the registry is away: stale routes to live
    orchestrators beat no routes at all.
    """

    def __init__(
        self,
        source: RouteSource,
        *,
        backoff_initial: timedelta = timedelta(milliseconds=100),
        backoff_max: timedelta = timedelta(seconds=5),
    ) -> None:
        self._source = source
        self._backoff_initial = backoff_initial.total_seconds()
        self._backoff_max = backoff_max.total_seconds()
        self._table: RouteTable | None = None
        self._loaded = asyncio.Event()
        self._listeners: list[TableListener] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def table(self) -> RouteTable | None:
        """The current table; None until the first snapshot arrives."""
        return self._table

    def add_listener(self, listener: TableListener) -> None:
        """Call `listener` with every new table."""
        self._listeners.append(listener)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="route-watcher")

    async def wait_loaded(self, patience: timedelta) -> bool:
        """Wait for the first snapshot; False if it did not come within `patience`."""
        try:
            await asyncio.wait_for(self._loaded.wait(), patience.total_seconds())
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop watching and close the source. Safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await self._source.close()

    async def _run(self) -> None:
        backoff = self._backoff_initial
        while True:
            try:
                async for update in self._source.watch():
                    metrics.ROUTE_STREAM_UP.set(1)
                    self._publish(self._table_after(update))
                    backoff = self._backoff_initial
                reason = "the registry ended the stream"
            except grpc.aio.AioRpcError as error:
                reason = f"{error.code().name}: {error.details()}"
            metrics.ROUTE_STREAM_UP.set(0)
            logger.warning(
                "route stream lost; serving the last table",
                extra={"reason": reason, "revision": self._table.revision if self._table else None},
            )
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not crypto
            backoff = min(backoff * 2, self._backoff_max)

    def _table_after(self, update: registry_pb.WatchRoutesResponse) -> RouteTable:
        return (self._table or RouteTable()).apply(update)

    def _publish(self, table: RouteTable) -> None:
        self._table = table
        self._loaded.set()
        metrics.ROUTE_REVISION.set(table.revision)
        for listener in self._listeners:
            listener(table)
