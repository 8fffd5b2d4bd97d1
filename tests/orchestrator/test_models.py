"""Loading and unloading models as the deployments say, readiness per model, and health."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from tritonclient.grpc import service_pb2 as triton

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.orchestrator.registry import RegistryDeployments
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.registry.v1 import registry_service_pb2_grpc as registry_grpc
from tensorway.runtime import ServiceBinding, ServiceSettings, create_server

from .conftest import StartOrchestrator, TcpProxy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Every model of the shared Triton: a deployment set without one would unload it for later tests.
DEMO_MODELS = frozenset({"simple", "simple_string", "digits", "iris", "accumulate"})
FAST_POLLS = timedelta(milliseconds=100)


class QueuedDeployments:
    """A deployment source the test feeds by hand."""

    def __init__(self) -> None:
        self.sets: asyncio.Queue[frozenset[str]] = asyncio.Queue()

    async def watch(self) -> AsyncIterator[frozenset[str]]:
        while True:
            yield await self.sets.get()


@pytest.fixture
async def iris_restored(triton_stub: Any) -> AsyncIterator[None]:
    """Tests here unload `iris` from the shared Triton: it is loaded before and after each."""
    load = triton.RepositoryModelLoadRequest(model_name="iris")
    await triton_stub.RepositoryModelLoad(load)
    yield
    await triton_stub.RepositoryModelLoad(load)


async def health_becomes(address: str, service: str, status: int, within: float = 10.0) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        async with asyncio.timeout(within):
            while True:
                try:
                    response = await health.Check(health_pb2.HealthCheckRequest(service=service))
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: not reported yet
                        raise
                else:
                    if response.status == status:
                        return
                await asyncio.sleep(0.05)


async def infer_iris(address: str) -> pb.InferResponse:
    rows = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    async with grpc.aio.insecure_channel(address) as channel:
        return await pb_grpc.InferenceServiceStub(channel).Infer(
            pb.InferRequest(
                model_name="iris",
                inputs=[
                    tensor_pb2.Tensor(
                        name="input", datatype="FP32", shape=[1, 4], raw_contents=rows.tobytes()
                    )
                ],
            )
        )


async def triton_has_ready(triton_stub: Any, model: str) -> bool:
    response = await triton_stub.ModelReady(triton.ModelReadyRequest(name=model))
    return bool(response.ready)


async def unload_on_triton(triton_stub: Any, model: str) -> None:
    await triton_stub.RepositoryModelUnload(triton.RepositoryModelUnloadRequest(model_name=model))
    index = triton.RepositoryIndexRequest(ready=False)
    # Unloading returns at once; the model is gone when its state is UNAVAILABLE.
    while True:
        models = (await triton_stub.RepositoryIndex(index)).models
        if all(m.state == "UNAVAILABLE" for m in models if m.name == model):
            return
        await asyncio.sleep(0.05)


async def test_models_are_loaded_and_unloaded_as_the_deployments_say(
    start_orchestrator: StartOrchestrator, triton_grpc: str, triton_stub: Any, iris_restored: None
) -> None:
    deployments = QueuedDeployments()
    address = await start_orchestrator(triton_grpc, deployments=deployments, health_interval=FAST_POLLS)
    assert (await infer_iris(address)).outputs

    await deployments.sets.put(DEMO_MODELS - {"iris"})
    await health_becomes(address, "models/iris", NOT_SERVING)
    assert not await triton_has_ready(triton_stub, "iris")
    assert await triton_has_ready(triton_stub, "digits")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await infer_iris(address)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "MODEL_NOT_READY"

    await deployments.sets.put(DEMO_MODELS)
    await health_becomes(address, "models/iris", SERVING)
    assert await triton_has_ready(triton_stub, "iris")
    assert (await infer_iris(address)).outputs[0].name == "label"


async def test_initial_models_are_loaded_at_start(
    start_orchestrator: StartOrchestrator, triton_grpc: str, triton_stub: Any, iris_restored: None
) -> None:
    await unload_on_triton(triton_stub, "iris")
    address = await start_orchestrator(triton_grpc, models=("iris",), health_interval=FAST_POLLS)
    await health_becomes(address, "models/iris", SERVING)
    assert (await infer_iris(address)).outputs


async def test_health_follows_triton_and_a_returning_triton_gets_its_models_again(
    start_orchestrator: StartOrchestrator, triton_proxy: TcpProxy, triton_stub: Any, iris_restored: None
) -> None:
    address = await start_orchestrator(triton_proxy.address, models=("iris",), health_interval=FAST_POLLS)
    await health_becomes(address, "", SERVING)
    await health_becomes(address, "models/iris", SERVING)

    triton_proxy.refuse()
    triton_proxy.sever()
    await health_becomes(address, "", NOT_SERVING)
    await health_becomes(address, "tensorway.inference.v1.InferenceService", NOT_SERVING)
    await health_becomes(address, "models/iris", NOT_SERVING)
    # Meanwhile the Triton restarts without the model.
    await unload_on_triton(triton_stub, "iris")

    triton_proxy.refuse(False)
    await health_becomes(address, "", SERVING)
    await health_becomes(address, "models/iris", SERVING)
    assert await triton_has_ready(triton_stub, "iris")


async def test_no_reachable_triton_is_not_serving(start_orchestrator: StartOrchestrator) -> None:
    address = await start_orchestrator("127.0.0.1:1", health_interval=FAST_POLLS)
    await health_becomes(address, "", NOT_SERVING)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await infer_iris(address)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


class FakeRegistry(registry_grpc.RegistryServiceServicer):
    """WatchRoutes from a script of responses; the watch breaks after the script, once."""

    def __init__(self, script: list[registry_pb.WatchRoutesResponse]) -> None:
        self.script = script
        self.watches = 0

    async def WatchRoutes(
        self, request: registry_pb.WatchRoutesRequest, context: Any
    ) -> AsyncIterator[registry_pb.WatchRoutesResponse]:
        self.watches += 1
        for response in self.script:
            yield response
        if self.watches == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "registry restarting")
        await asyncio.Event().wait()


def route(model: str, *pools: str) -> registry_pb.Route:
    return registry_pb.Route(
        model=model,
        versions=[
            registry_pb.VersionRoute(version=str(i), weight=1, pool=f"pools/{p}") for i, p in enumerate(pools)
        ],
    )


async def test_registry_routes_to_this_pool_become_the_deployments() -> None:
    registry = FakeRegistry(
        [
            registry_pb.WatchRoutesResponse(
                revision=1,
                snapshot=True,
                routes=[route("digits", "a"), route("iris", "b"), route("simple", "b", "a")],
            ),
            registry_pb.WatchRoutesResponse(
                revision=2, routes=[route("iris", "a")], removed_models=["digits"]
            ),
            registry_pb.WatchRoutesResponse(revision=3, routes=[route("simple", "b")]),
        ]
    )
    service = registry_pb.DESCRIPTOR.services_by_name["RegistryService"]
    server, port = create_server(
        "registry",
        ServiceSettings(metrics_enabled=False),
        [ServiceBinding(registry_grpc.add_RegistryServiceServicer_to_server, registry, service)],
    )
    await server.start()
    try:
        deployments = RegistryDeployments(f"127.0.0.1:{port}", "a", retry_delay=timedelta(milliseconds=10))
        seen: list[frozenset[str]] = []
        watch = deployments.watch()
        async with asyncio.timeout(10):
            async for models in watch:
                seen.append(models)
                if len(seen) == 6:
                    break
        await watch.aclose()
    finally:
        await server.stop()
    # The second watch starts from a fresh snapshot after the first one broke.
    assert (
        seen
        == [
            frozenset({"digits", "simple"}),
            frozenset({"iris", "simple"}),
            frozenset({"iris"}),
        ]
        * 2
    )
    assert registry.watches == 2
