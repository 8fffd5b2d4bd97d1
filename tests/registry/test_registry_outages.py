"""Redis or PostgreSQL stopped mid-test: what keeps answering, what fails and how, and that
everything is consistent once the server is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from tensorway.registry.v1 import registry_service_pb2 as pb
from tests.waiting import PATIENCE, eventually

from .conftest import PrivateBackends, RunningRegistry, Stub, deploy, failure, mask, start_registry, unique

Replicas = tuple[RunningRegistry, RunningRegistry]


@pytest.fixture
async def replicas(private_backends: PrivateBackends) -> AsyncIterator[Replicas]:
    urls = (private_backends.postgres.url, private_backends.redis.url)
    first = await start_registry(*urls)
    second = await start_registry(*urls)
    yield first, second
    await second.stop()
    await first.stop()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def resolved_version(stub: Stub, model: str) -> str:
    return (await stub.ResolveModel(pb.ResolveModelRequest(name=f"models/{model}"))).version


async def shift_traffic(stub: Stub, deployment: str, to: str) -> None:
    await stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(name=deployment, traffic=[pb.TrafficSplit(version=to, weight=100)]),
            update_mask=mask("traffic"),
        )
    )


async def test_redis_stopped_mid_test(private_backends: PrivateBackends, replicas: Replicas) -> None:
    writer, reader = replicas
    deployed = await deploy(writer.stub)
    name = f"models/{deployed.model}"
    for _ in range(2):
        await writer.stub.GetModel(pb.GetModelRequest(name=name))  # cached in Redis
    errors_before = sample("tensorway_registry_redis_errors_total")

    await private_backends.redis.stop_async()

    # Reads go to PostgreSQL, writes still work, and the other replica still hears of them
    # (through PostgreSQL's NOTIFY).
    await writer.stub.UpdateModel(
        pb.UpdateModelRequest(
            model=pb.Model(name=name, description="no redis"), update_mask=mask("description")
        )
    )
    assert (await reader.stub.GetModel(pb.GetModelRequest(name=name))).model.description == "no redis"
    await shift_traffic(writer.stub, deployed.deployment.name, "2")
    await eventually(lambda: _is(reader.stub, deployed.model, "2"))
    assert sample("tensorway_registry_redis_errors_total") > errors_before

    await private_backends.redis.start_async()
    # Once Redis answers again (after the outage backoff), reads use it and writes invalidate it.

    async def answers_from_redis(stub: Stub) -> bool:
        before = sample("tensorway_registry_cache_lookups_total", kind="model", tier="redis")
        for _ in range(2):  # the first may refill the cache
            await stub.GetModel(pb.GetModelRequest(name=name))
        return sample("tensorway_registry_cache_lookups_total", kind="model", tier="redis") > before

    for stub in (writer.stub, reader.stub):
        await eventually(lambda: answers_from_redis(stub), what="reads answered by Redis again")  # noqa: B023
    await writer.stub.UpdateModel(
        pb.UpdateModelRequest(
            model=pb.Model(name=name, description="redis back"), update_mask=mask("description")
        )
    )
    for stub in (writer.stub, reader.stub, writer.stub):
        assert (await stub.GetModel(pb.GetModelRequest(name=name))).model.description == "redis back"
    await shift_traffic(writer.stub, deployed.deployment.name, "1")
    await eventually(lambda: _is(reader.stub, deployed.model, "1"))


async def retry_unavailable(method: Any, request: Any, within: float = PATIENCE) -> Any:
    """Call until the answer is not UNAVAILABLE, as a client honouring RetryInfo would."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await method(request)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _is(stub: Stub, model: str, version: str) -> bool:
    try:
        return await resolved_version(stub, model) == version
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND until the deployment arrives
            raise
        return False


async def test_postgres_stopped_mid_test(private_backends: PrivateBackends, replicas: Replicas) -> None:
    writer, reader = replicas
    deployed = await deploy(writer.stub)
    name = f"models/{deployed.model}"
    await eventually(lambda: _is(reader.stub, deployed.model, "1"))
    cached = (await reader.stub.GetModel(pb.GetModelRequest(name=name))).model
    stale_before = sample("tensorway_registry_stale_answers_total", kind="route")

    await private_backends.postgres.stop_async()

    # Resolves and cached reads keep answering, on both replicas.
    for stub in (writer.stub, reader.stub):
        assert await resolved_version(stub, deployed.model) == "1"
        assert (await stub.GetModel(pb.GetModelRequest(name=name))).model == cached
    # Writes, and reads no cache can answer, fail UNAVAILABLE with a retry delay.
    lost = unique("lost")
    # A deadline on each call: a write that hung would end DEADLINE_EXCEEDED, not UNAVAILABLE.
    hung = 30
    for call in (
        writer.stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=f"models/{lost}")), timeout=hung),
        writer.stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=pb.Deployment(
                    name=deployed.deployment.name, traffic=[pb.TrafficSplit(version="2", weight=100)]
                ),
                update_mask=mask("traffic"),
            ),
            timeout=hung,
        ),
        reader.stub.ListModels(pb.ListModelsRequest(), timeout=hung),
    ):
        error = await failure(call)
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.reason == "UNAVAILABLE"
        assert error.retry_delay == 1.0
    assert await resolved_version(reader.stub, deployed.model) == "1"
    assert sample("tensorway_registry_stale_answers_total", kind="route") > stale_before

    await private_backends.postgres.start_async()

    # Callers retry UNAVAILABLE; within moments of the restart writes succeed again, the
    # failed ones left nothing behind, and both replicas agree again.
    await retry_unavailable(
        writer.stub.UpdateModel,
        pb.UpdateModelRequest(
            model=pb.Model(name=name, description="after restart"), update_mask=mask("description")
        ),
    )
    # The reader's pool may still be renewing after the restart: it too is retried.
    missing = await failure(
        retry_unavailable(reader.stub.GetModel, pb.GetModelRequest(name=f"models/{lost}"))
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    deployment = (
        await reader.stub.GetDeployment(pb.GetDeploymentRequest(name=deployed.deployment.name))
    ).deployment
    assert [(t.version, t.weight) for t in deployment.traffic] == [("1", 100)]

    # The reader's change feed reconnects and catches up: a write reaches it, made whether or not
    # the feed is back yet.
    await shift_traffic(writer.stub, deployed.deployment.name, "2")
    await eventually(lambda: _is(reader.stub, deployed.model, "2"))
    for stub in (writer.stub, reader.stub):
        assert (await stub.GetModel(pb.GetModelRequest(name=name))).model.description == "after restart"
