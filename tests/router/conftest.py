"""Real servers around the router: a small registry fake serving WatchRoutes, orchestrator fakes
that forward to the real Triton (or fail on demand), and the router itself."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_service

from tensorway.common.v1 import tensor_pb2
from tensorway.devstack import DevStackSettings, Stack
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.orchestrator import service as orchestrator_service
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.registry.v1 import registry_service_pb2_grpc as registry_grpc
from tensorway.router import service as router_service
from tensorway.runtime import ServiceBinding, ServiceServer, ServiceSettings, context, create_server
from tensorway.tensors.triton import from_triton_response, raw_inputs, to_triton_request
from tests.ports import free_port

DEMO_MODELS = ("simple", "simple_string", "digits", "iris")


class FakeRegistry(registry_grpc.RegistryServiceServicer):
    """WatchRoutes only: a snapshot of `routes` on connect, then every `publish` as a delta."""

    def __init__(self) -> None:
        self.routes: dict[str, registry_pb.Route] = {}
        self.revision = 0
        self._watchers: list[asyncio.Queue[registry_pb.WatchRoutesResponse]] = []

    def publish(self, routes: Iterable[registry_pb.Route] = (), removed: Iterable[str] = ()) -> None:
        routes, removed = list(routes), list(removed)
        self.revision += 1
        for route in routes:
            self.routes[route.model] = route
        for model in removed:
            self.routes.pop(model, None)
        delta = registry_pb.WatchRoutesResponse(revision=self.revision, routes=routes, removed_models=removed)
        for queue in self._watchers:
            queue.put_nowait(delta)

    async def WatchRoutes(
        self, request: registry_pb.WatchRoutesRequest, context: Any
    ) -> AsyncIterator[registry_pb.WatchRoutesResponse]:
        queue: asyncio.Queue[registry_pb.WatchRoutesResponse] = asyncio.Queue()
        self._watchers.append(queue)
        try:
            yield registry_pb.WatchRoutesResponse(
                revision=self.revision, snapshot=True, routes=list(self.routes.values())
            )
            while True:
                yield await queue.get()
        finally:
            self._watchers.remove(queue)


@dataclass
class FakeOrchestrator(pb_grpc.InferenceServiceServicer):
    """Forwards Infer (and Triton's ModelInfer) to the real Triton (running whatever version
    Triton has) and answers as the version the router asked for; or fails with `fail_with`, or
    waits `delay` seconds first, or until `gate` is set. With `drift`, Triton sees INT32 INPUT1
    values that much larger: the answers of a build of the model whose results moved."""

    triton_address: str
    name: str = "orchestrator"
    fail_with: grpc.StatusCode | None = None
    delay: float = 0.0
    gate: asyncio.Event | None = None
    drift: int = 0
    calls: int = 0
    versions: list[str] = field(default_factory=list)
    deadlines: list[float | None] = field(default_factory=list)
    arrivals: list[tuple[str, str]] = field(default_factory=list)
    """(sequence_id parameter, request id) of each request, in the order they arrived."""
    received: list[bytes] = field(default_factory=list)
    """Each Triton ModelInferRequest as the bytes that arrived."""
    _channel: grpc.aio.Channel | None = None

    def stub(self) -> Any:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.triton_address)
        return triton_service.GRPCInferenceServiceStub(self._channel)

    async def _arrive(self, version: str, sequence: str, request_id: str, ctx: Any) -> None:
        self.calls += 1
        self.versions.append(version)
        self.arrivals.append((sequence, request_id))
        current = context.current.get()
        self.deadlines.append(current.time_remaining() if current else None)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            await ctx.abort(self.fail_with, f"{self.name} fails on purpose")

    async def _triton_answer(self, upstream: Any) -> Any:
        upstream.model_version = ""
        if self.drift:
            index = next(i for i, tensor in enumerate(upstream.inputs) if tensor.name == "INPUT1")
            moved = np.frombuffer(upstream.raw_input_contents[index], dtype="<i4") + self.drift
            upstream.raw_input_contents[index] = moved.astype("<i4").tobytes()
        return await self.stub().ModelInfer(upstream)

    async def Infer(self, request: pb.InferRequest, ctx: Any) -> pb.InferResponse:
        sequence = request.parameters.get("sequence_id")
        await self._arrive(
            request.model_version, str(sequence.int64_value) if sequence else "", request.id, ctx
        )
        answer = await self._triton_answer(to_triton_request(request, raw_inputs(request)))
        response = from_triton_response(answer, request)
        response.model_version = request.model_version
        response.parameters["orchestrator"].string_value = self.name
        return response

    async def ModelInfer(self, data: bytes, ctx: Any) -> bytes:
        """Triton's ModelInfer, as the serialized bytes the router forwarded (recorded)."""
        self.received.append(data)
        request = triton.ModelInferRequest.FromString(data)
        sequence = request.parameters.get("sequence_id")
        await self._arrive(
            request.model_version, str(sequence.int64_param) if sequence else "", request.id, ctx
        )
        answer = await self._triton_answer(request)
        answer.model_version, answer.id = request.model_version, request.id
        serialized: bytes = answer.SerializeToString()
        return serialized

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


@dataclass
class Running:
    """A started server, its address, and how to stop it."""

    server: ServiceServer
    address: str

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


TRITON_SERVICE = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def add_triton_infer(orchestrator: FakeOrchestrator, server: grpc.aio.Server) -> None:
    """Triton's ModelInfer on serialized bytes, as a real orchestrator serves it to routers."""
    handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(orchestrator.ModelInfer)}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(TRITON_SERVICE.full_name, handlers),)
    )


async def start_orchestrator(orchestrator: FakeOrchestrator, port: int = 0) -> Running:
    server, bound = create_server(
        orchestrator.name,
        ServiceSettings(port=port, metrics_enabled=False),
        [
            ServiceBinding(
                pb_grpc.add_InferenceServiceServicer_to_server,
                orchestrator,
                pb.DESCRIPTOR.services_by_name["InferenceService"],
            ),
            ServiceBinding(add_triton_infer, orchestrator, TRITON_SERVICE),
        ],
    )
    server.on_stop(orchestrator.close)
    await server.start()
    return Running(server, f"127.0.0.1:{bound}")


async def wait_for_models(address: str, models: Iterable[str], patience: float = 60.0) -> None:
    """Until the orchestrator at `address` describes every model (its Tritons are ready)."""
    deadline = asyncio.get_running_loop().time() + patience
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for model in models:
            while True:
                try:
                    await stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name=model), timeout=2)
                    break
                except grpc.aio.AioRpcError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.1)


async def start_real_orchestrator(triton_address: str, models: Iterable[str] = DEMO_MODELS) -> Running:
    """tensorway's own orchestrator, in this process, in front of one Triton."""
    models = tuple(models)
    settings = orchestrator_service.Settings(tritons=(triton_address,), models=models, metrics_enabled=False)
    server, bound = await orchestrator_service.create(settings)
    await server.start()
    running = Running(server, f"127.0.0.1:{bound}")
    await wait_for_models(running.address, models)
    return running


async def start_registry(registry: FakeRegistry, port: int = 0) -> Running:
    server, bound = create_server(
        "registry",
        ServiceSettings(port=port, metrics_enabled=False),
        [
            ServiceBinding(
                registry_grpc.add_RegistryServiceServicer_to_server,
                registry,
                registry_pb.DESCRIPTOR.services_by_name["RegistryService"],
            )
        ],
    )
    await server.start()
    return Running(server, f"127.0.0.1:{bound}")


async def start_router(registry_address: str, **settings: Any) -> Running:
    server, bound = await router_service.create(
        router_service.Settings(registry_address=registry_address, metrics_enabled=False, **settings)
    )
    await server.start()
    return Running(server, f"127.0.0.1:{bound}")


def specs(tensors: Any, batch_dims: int) -> list[tensor_pb2.TensorSpec]:
    """Triton's tensor metadata as TensorSpecs, which leave out the batch dimension."""
    return [
        tensor_pb2.TensorSpec(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape[batch_dims:])
        for tensor in tensors
    ]


@pytest.fixture(scope="session")
async def demo_signatures(triton_grpc: str) -> dict[str, registry_pb.VersionRoute]:
    """Each demo model's signature as the registry would carry it (no endpoints yet)."""
    signatures = {}
    async with grpc.aio.insecure_channel(triton_grpc) as channel:
        stub = triton_service.GRPCInferenceServiceStub(channel)
        for model in DEMO_MODELS:
            metadata = await stub.ModelMetadata(triton.ModelMetadataRequest(name=model))
            config = (await stub.ModelConfig(triton.ModelConfigRequest(name=model))).config
            batched = 1 if config.max_batch_size > 0 else 0
            signatures[model] = registry_pb.VersionRoute(
                platform=metadata.platform,
                max_batch_size=config.max_batch_size,
                inputs=specs(metadata.inputs, batched),
                outputs=specs(metadata.outputs, batched),
            )
    return signatures


RouteFactory = Callable[..., registry_pb.Route]


@pytest.fixture
def make_route(demo_signatures: dict[str, registry_pb.VersionRoute]) -> RouteFactory:
    """`make_route(model, endpoints, weights={"1": 100}, aliases=..., shadow=...)`: a demo model's
    route with its real signature for every version."""

    def make(
        model: str,
        endpoints: Iterable[str],
        weights: dict[str, int] | None = None,
        aliases: dict[str, str] | None = None,
        shadow: tuple[str, int] | None = None,
    ) -> registry_pb.Route:
        route = registry_pb.Route(model=model, aliases=aliases or {})
        for version, weight in (weights or {"1": 100}).items():
            entry = route.versions.add()
            entry.CopyFrom(demo_signatures[model])
            entry.version, entry.weight, entry.pool = version, weight, "pools/test"
            entry.endpoints.extend(endpoints)
        if shadow is not None:
            route.shadow.version, route.shadow.percent = shadow
        return route

    return make


@dataclass
class Mesh:
    """A registry fake, orchestrator fakes and a router wired together."""

    registry: FakeRegistry
    registry_running: Running
    orchestrators: list[FakeOrchestrator]
    orchestrators_running: list[Running]
    router: Running

    @property
    def endpoints(self) -> list[str]:
        return [running.address for running in self.orchestrators_running]


MeshFactory = Callable[..., Awaitable[Mesh]]


@pytest.fixture
async def mesh(triton_grpc: str, make_route: RouteFactory) -> AsyncIterator[MeshFactory]:
    """`await mesh(orchestrators=1, routes=lambda endpoints: [...], real=False, **router_settings)`;
    by default every demo model at version 1 on every orchestrator. `real` puts tensorway's own
    orchestrators in place of the fakes. Everything stops after the test."""
    started: list[Running] = []

    async def build(
        orchestrators: int = 1,
        routes: Callable[[list[str]], list[registry_pb.Route]] | None = None,
        real: bool = False,
        **router_settings: Any,
    ) -> Mesh:
        fakes = [FakeOrchestrator(triton_grpc, name=f"orchestrator-{i}") for i in range(orchestrators)]
        if real:
            fakes = []
            running = [await start_real_orchestrator(triton_grpc) for _ in range(orchestrators)]
        else:
            running = [await start_orchestrator(fake) for fake in fakes]
        started.extend(running)
        endpoints = [r.address for r in running]
        registry = FakeRegistry()
        chosen = routes(endpoints) if routes else [make_route(model, endpoints) for model in DEMO_MODELS]
        registry.publish(chosen)
        registry_running = await start_registry(registry)
        started.append(registry_running)
        router = await start_router(registry_running.address, **router_settings)
        started.append(router)
        return Mesh(registry, registry_running, fakes, running, router)

    yield build
    for running in reversed(started):
        await running.server.stop()


@pytest.fixture(scope="session")
def second_triton() -> Iterator[str]:
    """A Triton of its own for a second orchestrator, so each orchestrator has its own pool."""
    state_dir = Path(tempfile.mkdtemp(prefix="tensorway-router-triton-"))
    stack = Stack(
        DevStackSettings(state_dir=state_dir).without_pinned_ports(),
        state_dir=state_dir,
        die_with_parent=True,
    )
    try:
        yield stack.ensure(["triton"]).endpoints()["triton_grpc"].address
    finally:
        stack.down()
        shutil.rmtree(state_dir, ignore_errors=True)


class OrchestratorProcess:
    """`tensorway serve orchestrator` as a child process, so a test can SIGKILL it and restart it
    on the same port."""

    def __init__(self, triton_address: str, models: Iterable[str]) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._models = tuple(models)
        self._env = {
            **os.environ,
            "TENSORWAY_ORCHESTRATOR_TRITONS": json.dumps([triton_address]),
            "TENSORWAY_ORCHESTRATOR_MODELS": json.dumps(self._models),
            "TENSORWAY_ORCHESTRATOR_METRICS_ENABLED": "false",
            "TENSORWAY_ORCHESTRATOR_LOG_LEVEL": "WARNING",
        }
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        tensorway = Path(sys.executable).parent / "tensorway"
        self._process = await asyncio.create_subprocess_exec(
            str(tensorway),
            "serve",
            "orchestrator",
            "--port",
            str(self.port),
            env=self._env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_for_models(self.address, self._models)

    async def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        self._process = None


@pytest.fixture
async def orchestrator_processes() -> AsyncIterator[Callable[[str, Iterable[str]], OrchestratorProcess]]:
    """Make OrchestratorProcesses; whichever still run are killed after the test."""
    made: list[OrchestratorProcess] = []

    def make(triton_address: str, models: Iterable[str]) -> OrchestratorProcess:
        made.append(OrchestratorProcess(triton_address, models))
        return made[-1]

    yield make
    for process in made:
        await process.kill()
