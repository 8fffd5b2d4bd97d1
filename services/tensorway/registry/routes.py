"""The routes each registry replica publishes: the table it keeps in memory, how it stays
current, and the WatchRoutes fan-out to its subscribers (routers and orchestrators keep their own
tables from it, `tensorway.router.routing.RouteTable` in a router).

The table is loaded whole at start. Each committed write announces its revision and models
on two channels, Redis pub/sub and PostgreSQL NOTIFY, so a replica hears of it even when one
of them is down; the first to arrive refreshes those models (through Redis, then PostgreSQL)
and the second finds the table already at that revision. After the PostgreSQL feed
reconnects, the whole table is reloaded, since changes may have been missed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from datetime import timedelta
from typing import Any

from tensorway.registry.cache import RedisCache, SingleFlight, route_key
from tensorway.registry.converters import route_from_bytes, route_to_bytes
from tensorway.registry.domain import Change, Route, RouteUpdate, Versioned
from tensorway.registry.store import RegistryStore

logger = logging.getLogger(__name__)

# A subscriber that falls this far behind gets a fresh snapshot instead of the backlog.
WATCHER_BACKLOG = 256


class RouteSubscription:
    """One WatchRoutes subscriber: the snapshot it starts from, then the updates it asked for."""

    def __init__(self, table: PublishedRoutes, models: frozenset[str]) -> None:
        self._table = table
        self._models = models
        self._queue: asyncio.Queue[RouteUpdate] = asyncio.Queue(WATCHER_BACKLOG)
        self._queue.put_nowait(table.snapshot(models))

    def offer(self, update: RouteUpdate) -> None:
        if self._models:
            routes = tuple(route for route in update.routes if route.model in self._models)
            removed = tuple(model for model in update.removed_models if model in self._models)
            if not (routes or removed):
                return
            update = RouteUpdate(update.revision, update.snapshot, routes, removed)
        try:
            self._queue.put_nowait(update)
        except asyncio.QueueFull:
            # Too slow to follow: replace the backlog by the table as it is now.
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(self._table.snapshot(self._models))

    async def next(self) -> RouteUpdate:
        return await self._queue.get()

    def close(self) -> None:
        self._table.unwatch(self)


class PublishedRoutes:
    """Every model's route, each with the revision it is current at."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._model_revisions: dict[str, int] = {}
        self._table_revision = 0
        self.revision = 0
        """The newest revision applied."""
        self._watchers: set[RouteSubscription] = set()

    def get(self, model: str) -> Route | None:
        return self._routes.get(model)

    def revision_of(self, model: str) -> int:
        """The revision up to which the table knows this model's route."""
        return max(self._table_revision, self._model_revisions.get(model, 0))

    def apply(self, model: str, route: Route | None, revision: int) -> None:
        """Take one model's route as read at `revision`, unless the table knows a newer one."""
        if revision <= self.revision_of(model):
            return
        self._model_revisions[model] = revision
        self.revision = max(self.revision, revision)
        if route is not None and route != self._routes.get(model):
            self._routes[model] = route
            self._publish(RouteUpdate(revision, False, (route,), ()))
        elif route is None and self._routes.pop(model, None) is not None:
            self._publish(RouteUpdate(revision, False, (), (model,)))

    def replace(self, routes: dict[str, Route], revision: int) -> None:
        """Take the whole table as read at `revision`, keeping routes known at newer revisions."""
        if revision <= self._table_revision:
            return
        changed, removed = [], []
        for model in sorted(routes.keys() | self._routes.keys()):
            if self._model_revisions.get(model, 0) >= revision:
                continue
            new, old = routes.get(model), self._routes.get(model)
            if new is None:
                del self._routes[model]
                removed.append(model)
            elif new != old:
                self._routes[model] = new
                changed.append(new)
        self._table_revision = revision
        self._model_revisions = {m: r for m, r in self._model_revisions.items() if r > revision}
        self.revision = max(self.revision, revision)
        if changed or removed:
            self._publish(RouteUpdate(revision, False, tuple(changed), tuple(removed)))

    def snapshot(self, models: frozenset[str] = frozenset()) -> RouteUpdate:
        routes = tuple(
            route for model, route in sorted(self._routes.items()) if not models or model in models
        )
        return RouteUpdate(self.revision, True, routes, ())

    def watch(self, models: Iterable[str] = ()) -> RouteSubscription:
        """A watcher that starts with the snapshot of now; `models` empty means all."""
        watcher = RouteSubscription(self, frozenset(models))
        self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: RouteSubscription) -> None:
        self._watchers.discard(watcher)

    def _publish(self, update: RouteUpdate) -> None:
        for watcher in list(self._watchers):
            watcher.offer(update)


class RouteSync:
    """Keeps a PublishedRoutes current from PostgreSQL, through Redis, as writes are announced."""

    def __init__(
        self, table: PublishedRoutes, store: RegistryStore, cache: RedisCache, reconnect_delay: timedelta
    ) -> None:
        self.table = table
        self._store = store
        self._cache = cache
        self._reconnect_delay = reconnect_delay
        self._flights: SingleFlight[str, Versioned[Route | None]] = SingleFlight()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Load the table, then follow both change channels."""
        await self.resync()
        self._spawn(self._follow_postgres())
        self._spawn(self._follow_redis())

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def resync(self) -> None:
        snapshot = await self._store.load_routes()
        self.table.replace(snapshot.value, snapshot.revision)

    async def refresh(self, change: Change) -> None:
        """Bring the table up to `change` for the models it names."""
        await asyncio.gather(*(self._refresh_model(model, change.revision) for model in change.models))

    async def _refresh_model(self, model: str, revision: int) -> None:
        if self.table.revision_of(model) < revision:
            loaded = await self.load_route(model, revision)
            self.table.apply(model, loaded.value, loaded.revision)

    async def load_route(self, model: str, min_revision: int = 0) -> Versioned[Route | None]:
        """The model's route at `min_revision` or newer: from Redis when it has one that recent,
        else from PostgreSQL (which then refills Redis). One load per model at a time.

        PostgreSQL's answer stands even when it is older than `min_revision`: a change announced
        with a revision the database has not got can only come from elsewhere, and asking
        again would spin."""
        loaded = await self._flights.do(model, lambda: self._fetch_route(model, min_revision))
        if loaded.revision >= min_revision:
            return loaded
        # That load was already under way, and may predate the revision this caller needs.
        return await self._fetch_route(model, min_revision)

    async def _fetch_route(self, model: str, min_revision: int) -> Versioned[Route | None]:
        key = route_key(model)
        cached = await self._cache.get(key)
        if cached is not None and cached.revision >= min_revision:
            return Versioned(route_from_bytes(cached.payload), cached.revision)
        loaded = await self._store.load_route(model)
        await self._cache.put(key, loaded.revision, route_to_bytes(loaded.value))
        return loaded

    async def _follow_postgres(self) -> None:
        async for change in self._store.changes(self._reconnect_delay):
            self._spawn(self.resync() if change is None else self.refresh(change))

    async def _follow_redis(self) -> None:
        async for change in self._cache.changes(self._reconnect_delay):
            self._spawn(self.refresh(change))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The next change, or the resync after PostgreSQL reconnects, catches the table up.
            logger.warning("route refresh failed: %s", task.exception())
