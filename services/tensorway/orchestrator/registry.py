"""The registry as the orchestrator's deployment source (WatchRoutes, narrowed to this pool), as
where it reports each model version's state on its Tritons (ReportModelStates), and as the
keeper of its pool's members, which it joins with a lease (JoinPool, LeavePool)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import timedelta

import grpc

from tensorway.orchestrator.models import DeployedModels, StateLine
from tensorway.registry.access import SYSTEM_TENANT, admin_metadata
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.registry.v1 import registry_service_pb2_grpc as registry_grpc
from tensorway.runtime import create_channel
from tensorway.tensors.signatures import ModelSignature, specs_from_proto

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

    async def watch(self) -> AsyncIterator[DeployedModels]:
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

    def _served_here(self, routes: Iterable[registry_pb.Route]) -> DeployedModels:
        versions: dict[str, dict[str, str]] = {}
        signatures: dict[tuple[str, str], ModelSignature] = {}
        for route in routes:
            for version in route.versions:
                if version.pool == self._pool_name:
                    versions.setdefault(route.model, {})[version.version] = version.artifact_uri
                    signatures[route.model, version.version] = _declared(route.model, version)
        return DeployedModels(versions, signatures)


def _declared(model: str, version: registry_pb.VersionRoute) -> ModelSignature:
    """The signature the registry declares for the version."""
    return ModelSignature(
        model,
        specs_from_proto(version.inputs),
        specs_from_proto(version.outputs),
        version.max_batch_size,
        versions=(version.version,),
    )


def advertised_address(host: str, port: int) -> str:
    """How the pool names this orchestrator when no address is configured: the host it binds,
    or, for a wildcard host, the machine's fully qualified name."""
    if host in {"", "0.0.0.0", "::", "[::]"}:  # nosec B104 - recognising a wildcard, not binding one
        host = socket.getfqdn()
    return f"{host}:{port}"


class RegistryStateReports:
    """Reports the versions' states to the registry as this orchestrator of the pool.

    Writes need `models.write`: the orchestrator calls as the mesh's own internal identity, which
    only callers inside the network can present (see docs/security.md).
    """

    def __init__(
        self, address: str, pool: str, endpoint: str, timeout: timedelta = timedelta(seconds=5)
    ) -> None:
        self._channel = create_channel(address)
        self._stub = registry_grpc.RegistryServiceStub(self._channel)
        self._pool_name = f"pools/{pool}"
        self._endpoint = endpoint
        self._timeout = timeout.total_seconds()

    async def report(self, lines: Sequence[StateLine]) -> None:
        request = registry_pb.ReportModelStatesRequest(
            pool=self._pool_name,
            endpoint=self._endpoint,
            states=[
                registry_pb.ModelStateReport(
                    model=line.model,
                    version=line.version,
                    triton=line.triton,
                    state=registry_pb.ModelVersionState.Value(f"MODEL_VERSION_STATE_{line.state.value}"),
                    reason=line.reason[:4096],
                )
                for line in lines
            ],
        )
        await self._stub.ReportModelStates(
            request, timeout=self._timeout, metadata=admin_metadata(SYSTEM_TENANT)
        )

    async def close(self) -> None:
        await self._channel.close()


class PoolMembership:
    """This orchestrator's place among its pool's members: it joins when it starts, renews its
    lease every `heartbeat` by joining again, and leaves when it stops. Should it die, the lease
    runs out and the registry removes it, so routers are sent to it for at most about `lease`.

    Joining writes the registry, as the mesh's internal identity, like the state reports.
    """

    def __init__(
        self,
        address: str,
        pool: str,
        endpoint: str,
        *,
        lease: timedelta,
        heartbeat: timedelta,
        timeout: timedelta = timedelta(seconds=2),
        on_joined: Callable[[], None] = lambda: None,
    ) -> None:
        self._channel = create_channel(address)
        self._stub = registry_grpc.RegistryServiceStub(self._channel)
        self._pool_name = f"pools/{pool}"
        self._endpoint = endpoint
        self._lease = lease
        self._heartbeat = heartbeat.total_seconds()
        # A failed join is retried sooner than a heartbeat: a pool created just after the
        # orchestrator started (a fresh stack) should not cost it a whole interval.
        self._retry = min(heartbeat, timedelta(seconds=1)).total_seconds()
        self._timeout = min(timeout, heartbeat).total_seconds()
        self.joined = asyncio.Event()
        """Set once the registry has taken this orchestrator into the pool."""
        self._on_joined = on_joined

    async def run(self) -> None:
        request = registry_pb.JoinPoolRequest(pool=self._pool_name, endpoint=self._endpoint)
        request.lease_duration.FromTimedelta(self._lease)
        while True:
            try:
                response = await self._stub.JoinPool(
                    request, timeout=self._timeout, metadata=admin_metadata(SYSTEM_TENANT)
                )
            except grpc.aio.AioRpcError as error:
                logger.warning("cannot join %s as %s: %s", self._pool_name, self._endpoint, error.details())
                await asyncio.sleep(self._retry)
                continue
            if response.joined:
                # The first join, or one after the lease ran out while the registry was out of
                # reach: the registry forgot what this orchestrator reported with its membership.
                logger.info("joined %s as %s", self._pool_name, self._endpoint)
                self._on_joined()
            self.joined.set()
            await asyncio.sleep(self._heartbeat)

    async def leave(self) -> None:
        """Leave the pool now; if the registry cannot be told, the lease runs out instead."""
        try:
            await self._stub.LeavePool(
                registry_pb.LeavePoolRequest(pool=self._pool_name, endpoint=self._endpoint),
                timeout=self._timeout,
                metadata=admin_metadata(SYSTEM_TENANT),
            )
        except grpc.aio.AioRpcError as error:
            logger.warning("cannot leave %s: %s; its lease will run out", self._pool_name, error.details())
        else:
            logger.info("left %s as %s", self._pool_name, self._endpoint)

    async def close(self) -> None:
        await self._channel.close()
