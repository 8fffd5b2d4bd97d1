"""Orchestrators in front of the session's real Triton, and a TCP proxy to stall or cut the way
between them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_service

from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.orchestrator import DeploymentSource, Settings, create
from tensorway.runtime import ServiceServer

StartOrchestrator = Callable[..., Awaitable[str]]


class TcpProxy:
    """A loopback TCP proxy that counts the bytes it forwards and can be stalled or cut."""

    def __init__(self, target: str) -> None:
        self._host, port = target.rsplit(":", 1)
        self._port = int(port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False
        self._connections: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.upstream_bytes = 0
        self.held = bytearray()
        """What reached the proxy on its way to Triton since the last `stall()`, while stalled."""
        self.connections = 0
        self.address = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.address

    def stall(self) -> None:
        """Hold every byte in both directions until `resume()`."""
        self.held.clear()
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def refuse(self, refusing: bool = True) -> None:
        """Turn new connections away (or take them again), as a Triton that is down would."""
        self._refusing = refusing

    def sever(self) -> None:
        """Cut every open connection, as a crashed Triton or a broken network would."""
        for writer in list(self._connections):
            writer.transport.abort()
        self._connections.clear()

    async def close(self) -> None:
        self.resume()
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.transport.abort()
            return
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection(self._host, self._port)
        self._connections |= {writer, upstream_writer}
        for pump in (
            self._pump(reader, upstream_writer, upstream=True),
            self._pump(upstream_reader, writer, upstream=False),
        ):
            task = asyncio.ensure_future(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if upstream and not self._flowing.is_set():
                    self.held += data
                await self._flowing.wait()
                if upstream:
                    self.upstream_bytes += len(data)
                sink.write(data)
                await sink.drain()
        sink.transport.abort()


@pytest.fixture
async def triton_proxy(triton_grpc: str) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(triton_grpc)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def start_orchestrator() -> AsyncIterator[StartOrchestrator]:
    """Start an orchestrator with the given Tritons and settings; stopped after the test."""
    servers: list[ServiceServer] = []

    async def start(*tritons: str, deployments: DeploymentSource | None = None, **settings: Any) -> str:
        server, port = await create(
            Settings(tritons=tritons, metrics_enabled=False, log_json=False, **settings), deployments
        )
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture(scope="module")
async def orchestrator(triton_grpc: str) -> AsyncIterator[str]:
    """An orchestrator straight in front of the session's Triton, shared by a module's tests."""
    server, port = await create(Settings(tritons=(triton_grpc,), metrics_enabled=False, log_json=False))
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop()


@pytest.fixture(scope="module")
async def stub(orchestrator: str) -> AsyncIterator[pb_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(orchestrator) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
async def triton_stub(triton_grpc: str) -> AsyncIterator[Any]:
    """Triton's own GRPCInferenceService, to compare with and to read statistics from."""
    async with grpc.aio.insecure_channel(triton_grpc) as channel:
        yield triton_service.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def inference_count(triton_stub: Any) -> Callable[[str], Awaitable[int]]:
    """Requests Triton has run or failed for a model since it started."""

    async def count(model: str) -> int:
        statistics = await triton_stub.ModelStatistics(triton.ModelStatisticsRequest(name=model))
        stats = statistics.model_stats[0].inference_stats
        return int(stats.success.count + stats.fail.count)

    return count
