"""The one server factory of tensorway, and the graceful way to run and stop a server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tensorway.runtime import heap, logs, tracing
from tensorway.runtime.interceptors import ClientInterceptor, ServerInterceptor
from tensorway.runtime.metrics import start_metrics_server
from tensorway.runtime.settings import ServiceSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer and how to add it: `add_to_server` is the generated `add_XServicer_to_server`."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: object
    descriptor: ServiceDescriptor


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


# Large tensors: each HTTP/2 stream may take 8 MiB before the receiver must update its window (BDP
# probing still grows it further), so a message of megabytes is not sent a window at a time while
# the window grows from gRPC's 64 KiB. In a 4 MiB echo between two grpc.aio processes on two
# shared cores it took the median from 11.4 to 10.3 ms; the rest of a large message's cost is
# gRPC's framing and copies, not the windows.
FLOW_CONTROL_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.http2.lookahead_bytes", 8 * 1024 * 1024),)


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    # Without this, gRPC's SO_REUSEPORT lets a second server silently share a taken port.
    # Metadata past gRPC's default 8 KiB is refused as RESOURCE_EXHAUSTED, which clients retry:
    # Envoy forwards up to its own header cap (16 KiB) plus what it adds, so accept well past that.
    return [
        *message_size_options(max_message_bytes),
        *FLOW_CONTROL_OPTIONS,
        ("grpc.so_reuseport", 0),
        ("grpc.max_metadata_size", 64 * 1024),
    ]


def create_channel(
    target: str, max_message_bytes: int = 64 * 1024 * 1024, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A channel to another tensorway service (or Triton) that propagates request context;
    ``options`` are further gRPC channel arguments."""
    return grpc.aio.insecure_channel(
        target,
        options=[*message_size_options(max_message_bytes), *options],
        interceptors=[ClientInterceptor()],
    )


class ServiceServer:
    """A started-or-not gRPC server with health, reflection and metrics.

    `start()`, `wait()` and `stop()` are separate so tests and `serve()` compose them.
    """

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        service_names: Sequence[str],
    ) -> None:
        self.name = name
        self.settings = settings
        self.health = health_servicer
        self.service_names = list(service_names)
        self.metrics_port: int | None = None
        self.ports: dict[str, int] = {}
        """Ports the service listens on besides gRPC and metrics, by what they serve (``"http"``)."""
        self._server = server
        self._metrics_server: Any = None
        self._cleanups: list[Callable[[], Awaitable[None]]] = []
        self._startups: list[Callable[[], Awaitable[None]]] = []
        self._drains: list[Callable[[], Awaitable[None]]] = []
        self._stopping: asyncio.Task[None] | None = None

    def on_start(self, startup: Callable[[], Awaitable[None]]) -> None:
        """Run `startup` once the gRPC server has started and before health says SERVING (opening
        another door, such as an HTTP port), first added first."""
        self._startups.append(startup)

    def on_drain(self, drain: Callable[[], Awaitable[None]]) -> None:
        """Run `drain` when stopping begins, before the server refuses new calls (leaving a pool,
        so callers stop choosing this server while it can still answer them)."""
        self._drains.append(drain)

    def on_stop(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        """Run `cleanup` after the server stops (closing channels, draining queues), last added first."""
        self._cleanups.append(cleanup)

    async def set_serving(self, serving: bool, service: str = "") -> None:
        """Report health for one service, or for the whole server with `service=""`."""
        states = health_pb2.HealthCheckResponse
        status = states.SERVING if serving else states.NOT_SERVING
        for name in [service] if service else ["", *self.service_names]:
            await self.health.set(name, status)

    async def start(self) -> None:
        if self.settings.metrics_enabled:
            self._metrics_server, self.metrics_port = start_metrics_server(
                self.settings.host, self.settings.metrics_port
            )
        await self._server.start()
        for startup in self._startups:
            await startup()
        await self.set_serving(True)
        logger.info("serving", extra={"service": self.name, "services": self.service_names})

    async def wait(self) -> None:
        # Shielded: grpc awaits its own shutdown future here, so cancelling this wait would
        # cancel that future, and the graceful `stop()` that awaits it would end at once with
        # CancelledError, skipping the cleanups.
        await asyncio.shield(self._server.wait_for_termination())

    async def stop(self, grace: timedelta | None = None) -> None:
        """The drains, health NOT_SERVING, stop with grace, then the cleanups. Safe to call twice."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(
                self._stop(self.settings.grace if grace is None else grace)
            )
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: timedelta) -> None:
        for drain in self._drains:
            try:
                await drain()
            except Exception:
                logger.exception("drain failed during shutdown")
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace.total_seconds())
        for cleanup in reversed(self._cleanups):
            try:
                await cleanup()
            except Exception:
                logger.exception("cleanup failed during shutdown")
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        logger.info("stopped", extra={"service": self.name})


def create_server(
    name: str, settings: ServiceSettings, bindings: Sequence[ServiceBinding]
) -> tuple[ServiceServer, int]:
    """Build a server with the given services plus health and reflection; returns it and its port."""
    server = grpc.aio.server(
        interceptors=[ServerInterceptor()], options=server_options(settings.max_message_bytes)
    )
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = [binding.descriptor.full_name for binding in bindings]
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    try:
        port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    except RuntimeError as exc:
        raise OSError(f"{name}: cannot bind {settings.host}:{settings.port} (address in use?)") from exc
    return ServiceServer(name, settings, server, health_servicer, service_names), port


def configure_process(name: str, settings: ServiceSettings) -> None:
    """Logging, tracing and the C heap for a process that runs one service."""
    logs.configure(settings.log_level, settings.log_json)
    heap.retain_freed_memory(settings.heap_retained_bytes)
    tracing.configure(name, settings.otlp_endpoint, settings.trace_sample_ratio)


async def serve(
    creating: Coroutine[Any, Any, tuple[ServiceServer, int]], on_created: Callable[[int], None]
) -> None:
    """Create the server (`creating`, a service's `create`), tell `on_created` its port, start
    it and run it until SIGTERM or SIGINT, then stop it gracefully.

    The signals count from the start: one that comes while the service is still being created
    (a rollout or a scale-down while it waits for PostgreSQL, Kafka or its first routes) cancels
    the creation, whose clean-ups run, and the process ends with status 0 instead of being
    killed by the signal with nothing cleaned up."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    created = asyncio.ensure_future(creating)
    signalled = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait({created, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if not created.done():
        created.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await created
        logger.info("stopped before it started serving")
        return
    try:
        server, port = created.result()
    except BaseException:
        signalled.cancel()
        raise
    on_created(port)
    await server.start()
    terminated = asyncio.ensure_future(server.wait())
    await asyncio.wait({terminated, signalled}, return_when=asyncio.FIRST_COMPLETED)
    terminated.cancel()
    signalled.cancel()
    await asyncio.gather(terminated, signalled, return_exceptions=True)
    await server.stop()
