"""Two registry replicas on one PostgreSQL and Redis see each other's writes, by the change feed
and not by a cache expiring (how soon is the registry benchmark's to measure, not a test's)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from tensorway.registry.v1 import registry_service_pb2 as pb
from tests.waiting import PATIENCE, eventually

from .conftest import RunningRegistry, deploy, mask, start_registry


@pytest.fixture
async def replicas(
    postgres_url: str, redis_url: str
) -> AsyncIterator[tuple[RunningRegistry, RunningRegistry]]:
    first = await start_registry(postgres_url, redis_url)
    second = await start_registry(postgres_url, redis_url)
    yield first, second
    await second.stop()
    await first.stop()


def split(deployment: str, *weights: tuple[str, int]) -> pb.UpdateDeploymentRequest:
    return pb.UpdateDeploymentRequest(
        deployment=pb.Deployment(
            name=deployment, traffic=[pb.TrafficSplit(version=v, weight=w) for v, w in weights]
        ),
        update_mask=mask("traffic"),
    )


async def test_a_deployment_written_on_one_replica_resolves_on_the_other(
    replicas: tuple[RunningRegistry, RunningRegistry],
) -> None:
    writer, reader = replicas
    deployed = await deploy(writer.stub)
    name = f"models/{deployed.model}"

    async def reader_resolves_version(expected: str) -> bool:
        try:
            return (await reader.stub.ResolveModel(pb.ResolveModelRequest(name=name))).version == expected
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND until the deployment arrives
                raise
            return False

    await eventually(lambda: reader_resolves_version("1"))
    await writer.stub.UpdateDeployment(split(deployed.deployment.name, ("1", 10), ("2", 90)))
    await eventually(lambda: reader_resolves_version("2"))


async def test_reads_through_the_cache_see_the_other_replicas_writes(
    replicas: tuple[RunningRegistry, RunningRegistry],
) -> None:
    writer, reader = replicas
    deployed = await deploy(writer.stub)
    name = f"models/{deployed.model}"
    cached = (await reader.stub.GetModel(pb.GetModelRequest(name=name))).model
    await reader.stub.GetModel(pb.GetModelRequest(name=name))  # now served by Redis

    await writer.stub.UpdateModel(
        pb.UpdateModelRequest(model=pb.Model(name=name, description="new"), update_mask=mask("description"))
    )

    async def reader_sees_update() -> bool:
        model = (await reader.stub.GetModel(pb.GetModelRequest(name=name))).model
        return model.description == "new" and model.etag != cached.etag

    await eventually(reader_sees_update)


async def test_a_watcher_on_one_replica_sees_a_write_on_the_other(
    replicas: tuple[RunningRegistry, RunningRegistry],
) -> None:
    writer, watched = replicas
    deployed = await deploy(writer.stub)
    call = watched.stub.WatchRoutes(pb.WatchRoutesRequest(models=[deployed.model]))
    snapshot = await call.read()
    if not snapshot.routes:  # the watched replica may not have heard of the deployment yet
        assert (await asyncio.wait_for(call.read(), timeout=PATIENCE)).routes

    await writer.stub.UpdateDeployment(split(deployed.deployment.name, ("1", 40), ("2", 60)))
    change = await asyncio.wait_for(call.read(), timeout=PATIENCE)
    assert [(v.version, v.weight) for v in change.routes[0].versions] == [("1", 40), ("2", 60)]
    call.cancel()


async def test_a_replica_started_later_loads_the_whole_table(
    postgres_url: str, redis_url: str, replicas: tuple[RunningRegistry, RunningRegistry]
) -> None:
    writer, _ = replicas
    deployed = await deploy(writer.stub)
    late = await start_registry(postgres_url, redis_url)
    try:
        call = late.stub.WatchRoutes(pb.WatchRoutesRequest())
        snapshot = await call.read()
        assert snapshot.snapshot
        assert deployed.model in {route.model for route in snapshot.routes}
        call.cancel()
    finally:
        await late.stop()


@pytest.mark.parametrize("resolve_from", ["redis", "postgres"])
async def test_resolving_through_redis_or_postgres_gives_the_same_current_answers(
    postgres_url: str, redis_url: str, resolve_from: str
) -> None:
    writer = await start_registry(postgres_url, redis_url)
    resolver = await start_registry(postgres_url, redis_url, resolve_from=resolve_from)
    try:
        deployed = await deploy(writer.stub)
        request = pb.ResolveModelRequest(name=f"models/{deployed.model}")
        expected = await writer.stub.ResolveModel(request)
        assert await resolver.stub.ResolveModel(request) == expected
        await writer.stub.UpdateDeployment(split(deployed.deployment.name, ("1", 20), ("2", 80)))
        # Redis holds a tombstone for the route since the write committed; nothing stale is served.
        assert (await resolver.stub.ResolveModel(request)).version == "2"
    finally:
        await resolver.stop()
        await writer.stop()
