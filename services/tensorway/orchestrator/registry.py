"""The registry as the orchestrator's deployment source: WatchRoutes, narrowed to this pool."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta

import grpc

from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.registry.v1 import registry_service_pb2_grpc as registry_grpc
from tensorway.runtime import create_channel

logger = logging.getLogger(__name__)


class RegistryDeployments:
    """The models whose routes send traffic to this pool, following the registry's WatchRoutes.

    The watch is reopened after a failure (its first message is a fresh snapshot); while the
    registry is away, the last set stays in force because nothing new is yielded.
    """

    def __init__(self, address: str, pool: str, retry_delay: timedelta = timedelta(seconds=1)) -> None:
        self._address = address
        self._pool_name = f"pools/{pool}"
        self._retry_delay = retry_delay.total_seconds()

    async def watch(self) -> AsyncIterator[frozenset[str]]:
        routes: dict[str, registry_pb.Route] = {}
        async with create_channel(self._address) as channel:
            stub = registry_grpc.RegistryServiceStub(channel)
            while True:
                try:
                    async for change in stub.WatchRoutes(registry_pb.WatchRoutesRequest()):
                        if change.snapshot:
                            routes.clear()
                        routes.update((route.model, route) for route in change.routes)
                        for model in change.removed_models:
                            routes.pop(model, None)
                        yield self._served_here(routes.values())
                except grpc.aio.AioRpcError as error:
                    logger.warning("watching routes at %s failed: %s", self._address, error.details())
                await asyncio.sleep(self._retry_delay)

    def _served_here(self, routes: Iterable[registry_pb.Route]) -> frozenset[str]:
        return frozenset(
            route.model
            for route in routes
            if any(version.pool == self._pool_name for version in route.versions)
        )
