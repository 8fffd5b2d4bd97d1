"""Registry servers on real PostgreSQL and Redis, and backends a test may stop and restart.

Most tests share the session's PostgreSQL and Redis and keep apart by unique model names.
The stub a test gets calls as an admin (the identity Envoy forwards for an admin token), as
every writer must; `RunningRegistry.stub_as` gives a stub with another identity, or none.
Tests that take a server down get their own (`private_backends`), started through the
local stack's launcher in a state dir of their own, so stopping one disturbs no other test.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tensorway.common.v1 import tensor_pb2
from tensorway.devstack import Component, DevStackSettings, Stack, default_components
from tensorway.registry.access import admin_metadata
from tensorway.registry.service import Settings, create
from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.registry.v1 import registry_service_pb2_grpc as pb_grpc
from tensorway.runtime import ServiceServer

Stub = pb_grpc.RegistryServiceStub
Identity = Sequence[tuple[str, str]]
ADMIN = admin_metadata("registry-tests")


class _Identified:
    def __init__(self, identity: Identity) -> None:
        self._identity = list(identity)

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=grpc.aio.Metadata(*self._identity, *(details.metadata or ())))


class _UnaryAs(_Identified, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamAs(_Identified, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def calls_as(identity: Identity) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add an identity to every call on a channel, as Envoy does for a
    token's holder (grpc.aio files an interceptor under one kind of call only, hence two)."""
    return [_UnaryAs(identity), _StreamAs(identity)]


@dataclass
class RunningRegistry:
    """A started registry server and an admin's stub connected to it."""

    server: ServiceServer
    address: str
    channel: grpc.aio.Channel
    stub: Stub

    def __post_init__(self) -> None:
        self._other_channels: list[grpc.aio.Channel] = []

    def stub_as(self, identity: Identity | None) -> Stub:
        """A stub that calls with `identity` (None: with no identity at all)."""
        interceptors = [] if identity is None else calls_as(identity)
        channel = grpc.aio.insecure_channel(self.address, interceptors=interceptors)
        self._other_channels.append(channel)
        return pb_grpc.RegistryServiceStub(channel)

    async def stop(self) -> None:
        for channel in [self.channel, *self._other_channels]:
            await channel.close()
        await self.server.stop()


async def start_registry(postgres_url: str, redis_url: str, **overrides: Any) -> RunningRegistry:
    settings = Settings(
        postgres_url=postgres_url,
        redis_url=redis_url,
        metrics_enabled=False,
        postgres_timeout=1,
        **overrides,
    )
    server, port = await create(settings)
    await server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address, interceptors=calls_as(ADMIN))
    return RunningRegistry(server, address, channel, pb_grpc.RegistryServiceStub(channel))


@pytest.fixture
async def registry(postgres_url: str, redis_url: str) -> AsyncIterator[RunningRegistry]:
    running = await start_registry(postgres_url, redis_url)
    yield running
    await running.stop()


@pytest.fixture
def stub(registry: RunningRegistry) -> Stub:
    return registry.stub


class Backend:
    """One server of a private stack that a test can stop and start again on the same port."""

    def __init__(self, component: Component, state_dir: Path) -> None:
        self.name = component.name
        self._settings = DevStackSettings(state_dir=state_dir).without_pinned_ports()
        self._component = component
        self.url = ""

    def _stack(self) -> Stack:
        return Stack(self._settings, state_dir=self._settings.state_dir, components=[self._component])

    def start(self) -> None:
        state = self._stack().up()
        endpoint = state.components[self.name].endpoints[self.name]
        assert endpoint.url is not None
        self.url = endpoint.url
        # Restarts reuse the port, so clients reconnect to the address they know.
        port = int(endpoint.address.rsplit(":", 1)[1])
        self._settings = self._settings.model_copy(update={f"{self.name}_port": port})

    def stop(self) -> None:
        self._stack().down()

    async def stop_async(self) -> None:
        # In a thread: the registry under test shares this event loop and keeps serving.
        await asyncio.to_thread(self.stop)

    async def start_async(self) -> None:
        await asyncio.to_thread(self.start)


@dataclass
class PrivateBackends:
    postgres: Backend
    redis: Backend


@pytest.fixture
def private_backends() -> Iterator[PrivateBackends]:
    """A PostgreSQL and a Redis of this test's own, each in its own state dir."""
    # PostgreSQL runs as `nobody` when tests run as root: its directory must be reachable.
    root = Path(tempfile.mkdtemp(prefix="tensorway-registry-test-"))
    root.chmod(0o755)
    components = {component.name: component for component in default_components()}
    backends = [Backend(components[name], root / name) for name in ("postgres", "redis")]
    try:
        for backend in backends:
            backend.start()
        yield PrivateBackends(*backends)
    finally:
        for backend in backends:
            backend.stop()
        shutil.rmtree(root, ignore_errors=True)


def unique(prefix: str = "m") -> str:
    """A fresh DNS label, so tests sharing one database never collide."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def version_body(**overrides: Any) -> pb.ModelVersion:
    fields: dict[str, Any] = {
        "platform": "onnxruntime_onnx",
        "inputs": [tensor_pb2.TensorSpec(name="input", datatype="FP32", shape=[64])],
        "outputs": [tensor_pb2.TensorSpec(name="label", datatype="INT64", shape=[1])],
        "max_batch_size": 256,
        "artifact_uri": "s3://models/digits/1",
    }
    fields.update(overrides)
    return pb.ModelVersion(**fields)


@dataclass
class Deployed:
    """A model with versions 1 and 2, a pool and a deployment sending all traffic to 1."""

    model: str
    pool: str
    deployment: pb.Deployment


async def deploy(stub: Stub, versions: int = 2, endpoints: tuple[str, ...] = ("127.0.0.1:7001",)) -> Deployed:
    model, pool = unique("model"), unique("pool")
    await stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=f"models/{model}")))
    for _ in range(versions):
        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(parent=f"models/{model}", model_version=version_body())
        )
    await stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name=f"pools/{pool}", endpoints=list(endpoints))))
    created = await stub.CreateDeployment(
        pb.CreateDeploymentRequest(
            parent=f"models/{model}",
            deployment_id="main",
            deployment=pb.Deployment(
                pool=f"pools/{pool}", traffic=[pb.TrafficSplit(version="1", weight=100)]
            ),
        )
    )
    return Deployed(model, pool, created.deployment)


@dataclass
class StatusDetails:
    """The google.rpc details of a failed call."""

    code: grpc.StatusCode
    reason: str
    violations: list[tuple[str, str]]
    resource: tuple[str, str] | None
    retry_delay: float | None


def details_of(error: grpc.aio.AioRpcError) -> StatusDetails:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "every error carries google.rpc details"
    reason, violations, resource, delay = "", [], None, None
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.ResourceInfo,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                if isinstance(message, error_details_pb2.ErrorInfo):
                    reason = message.reason
                elif isinstance(message, error_details_pb2.BadRequest):
                    violations = [(v.field, v.description) for v in message.field_violations]
                elif isinstance(message, error_details_pb2.ResourceInfo):
                    resource = (message.resource_type, message.resource_name)
                else:
                    delay = message.retry_delay.ToTimedelta().total_seconds()
    return StatusDetails(error.code(), reason, violations, resource, delay)


async def failure(call: Any) -> StatusDetails:
    """Await a call that must fail; its status details."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return details_of(caught.value)
