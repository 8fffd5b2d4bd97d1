"""The whole real-time path with nothing faked: the registry (on PostgreSQL and Redis) pushes
routes, tensorway's orchestrators front the real Triton, and Triton's own clients talk to the
router. Then the registry goes away and inference carries on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import numpy as np
import psycopg
import pytest
import redis
import tritonclient.grpc.aio as aioclient
from psycopg import sql
from tritonclient.utils import InferenceServerException

from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tests.registry.conftest import RunningRegistry
from tests.registry.conftest import start_registry as start_real_registry
from tests.router.conftest import Running, start_real_orchestrator, start_router
from tests.router.test_triton_clients import OUTPUTS, demo_inputs, outputs_of, triton_inputs

# The demo models whose Triton names are registry names too (DNS labels; simple_string is not).
MODELS = ("simple", "digits", "iris")


async def ignore_existing(call: Any) -> None:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


async def deploy(
    registry: RunningRegistry, endpoints: list[str], signatures: dict[str, registry_pb.VersionRoute]
) -> list[str]:
    """Register the demo models at version 1 on a fresh pool of `endpoints`; their deployments' names."""
    stub, suffix = registry.stub, uuid.uuid4().hex[:8]
    pool = f"pools/router-e2e-{suffix}"
    await stub.CreatePool(
        registry_pb.CreatePoolRequest(pool=registry_pb.Pool(name=pool, endpoints=endpoints))
    )
    deployments = []
    for model in MODELS:
        signature = signatures[model]
        await ignore_existing(
            stub.CreateModel(registry_pb.CreateModelRequest(model=registry_pb.Model(name=f"models/{model}")))
        )
        version = registry_pb.ModelVersion(
            platform=signature.platform,
            inputs=signature.inputs,
            outputs=signature.outputs,
            max_batch_size=signature.max_batch_size,
            artifact_uri=f"file://demo-models/{model}/1",
        )
        await ignore_existing(
            stub.CreateModelVersion(
                registry_pb.CreateModelVersionRequest(
                    parent=f"models/{model}", model_version_id="1", model_version=version
                )
            )
        )
        created = await stub.CreateDeployment(
            registry_pb.CreateDeploymentRequest(
                parent=f"models/{model}",
                deployment_id=f"router-e2e-{suffix}",
                deployment=registry_pb.Deployment(
                    pool=pool, traffic=[registry_pb.TrafficSplit(version="1", weight=100)]
                ),
            )
        )
        deployments.append(created.deployment.name)
    return deployments


@pytest.fixture
async def orchestrators(triton_grpc: str) -> AsyncIterator[list[Running]]:
    running = [await start_real_orchestrator(triton_grpc, MODELS) for _ in range(2)]
    yield running
    for orchestrator in running:
        await orchestrator.server.stop()


@pytest.fixture
def own_registry_store(postgres_url: str, redis_url: str) -> Iterator[tuple[str, str]]:
    """A database of the test's own on the session's PostgreSQL, and a Redis database no other
    test uses: the demo models' names are everyone's, and routes other tests leave behind (on
    pools whose orchestrators they stopped) must not be what this one resolves. Every test that
    uses it shares the Redis database, so it starts empty: the registry's cache would otherwise
    answer with the routes of the test before."""
    name = f"e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    own_redis = redis_url.rsplit("/", 1)[0] + "/7"
    with redis.Redis.from_url(own_redis) as cache:
        cache.flushdb()
    try:
        yield urlunsplit(urlsplit(postgres_url)._replace(path=f"/{name}")), own_redis
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


async def test_real_registry_orchestrators_and_triton_clients_and_a_registry_outage(
    own_registry_store: tuple[str, str],
    triton_grpc: str,
    orchestrators: list[Running],
    demo_signatures: dict[str, registry_pb.VersionRoute],
) -> None:
    postgres_url, redis_url = own_registry_store
    registry = await start_real_registry(postgres_url, redis_url)
    await deploy(registry, [o.address for o in orchestrators], demo_signatures)
    router = await start_router(registry.address)
    try:
        async with (
            aioclient.InferenceServerClient(router.address) as routed,
            aioclient.InferenceServerClient(triton_grpc) as direct,
        ):
            for model in MODELS:
                assert await routed.is_model_ready(model)
                inputs = demo_inputs(model)
                ours = outputs_of(await routed.infer(model, triton_inputs(inputs)), OUTPUTS[model])
                theirs = outputs_of(await direct.infer(model, triton_inputs(inputs)), OUTPUTS[model])
                for name in OUTPUTS[model]:
                    np.testing.assert_array_equal(ours[name], theirs[name])
            with pytest.raises(InferenceServerException) as raised:
                await routed.infer("no-such-model", triton_inputs(demo_inputs("simple")))
            assert raised.value.status() == str(grpc.StatusCode.NOT_FOUND)

            await registry.stop()
            answers = await asyncio.gather(
                *(routed.infer(MODELS[i % 3], triton_inputs(demo_inputs(MODELS[i % 3]))) for i in range(150))
            )
            assert len(answers) == 150
            assert await routed.is_model_ready("digits")
    finally:
        await router.server.stop()
        await registry.stop()
