"""What a server span costs per request: tensorway's interceptor against the gRPC instrumentation
package's (`opentelemetry-instrumentation-grpc`, named by the product card).

One `grpc.aio` server per configuration, each with a trivial unary method (bytes back as they
came), called N times from one client at one request in flight, in rounds that take the
configurations in turn so a busy machine slows them alike; the p50 per request of each, and its
cost over the bare server of the same run:

  bare                       no interceptor at all
  ours, tracing off          runtime.interceptors.ServerInterceptor (context, metrics, error
                             mapping) in a process that exports no spans: no span is made
  ours, tracing on           the same, exporting: a span per call
  ours + package, off        our interceptor with its span left out, and the package's aio server
                             interceptor before it, with a no-op tracer provider (what switching
                             would run with tracing off)
  ours + package, on         the same with the SDK tracer provider (what switching would run)

Tracing on is the SDK tracer provider with the services' sampler, ParentBased(TraceIdRatioBased),
at ratio 1.0 so every request is traced (what a traced request costs; the shipped default ratio
samples 1 %), and a batch span processor whose exporter drops the spans, so the figures are the
spans' cost in the request, not the network's.

    .venv/bin/python bench/tracing_bench.py [--requests 4000] [--rounds 5]

It needs the package, at the release that matches the installed opentelemetry-sdk (0.66b2 for
1.45): `.venv/bin/pip install opentelemetry-instrumentation-grpc==0.66b2`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import grpc
from benchkit import percentile_ms
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from tensorway.runtime import tracing
from tensorway.runtime.interceptors import ServerInterceptor

# Every request traced: the figures are what a traced request costs.
TRACED_SHARE = 1.0
METHOD = "/bench.Echo/Call"


class _DroppingExporter(SpanExporter):
    """Takes every batch and keeps nothing."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


def _echo_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(_echo)}
    )


class _Configuration:
    """One server and whether the process exports spans while it is measured."""

    def __init__(
        self, name: str, interceptors: Sequence[grpc.aio.ServerInterceptor], exporting: bool
    ) -> None:
        self.name = name
        self.exporting = exporting
        self.server = grpc.aio.server(interceptors=list(interceptors))
        self.server.add_generic_rpc_handlers([_echo_handler()])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.latencies: list[float] = []


async def _measure(configuration: _Configuration, requests: int) -> None:
    # Our interceptor decides per call from this flag whether to make a span, as in a service
    # that configured (or not) an OTLP endpoint.
    tracing._exporting = configuration.exporting  # the switch configure() sets
    async with grpc.aio.insecure_channel(f"127.0.0.1:{configuration.port}") as channel:
        call = channel.unary_unary(METHOD)
        payload = b"x" * 64
        for _ in range(100):  # warm the connection and the interceptors' per-method caches
            await call(payload)
        for _ in range(requests):
            started = time.perf_counter()
            await call(payload)
            configuration.latencies.append(time.perf_counter() - started)


async def run(requests: int, rounds: int) -> list[tuple[str, float]]:
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: "bench"}),
        sampler=ParentBased(TraceIdRatioBased(TRACED_SHARE)),
    )
    provider.add_span_processor(BatchSpanProcessor(_DroppingExporter()))
    trace.set_tracer_provider(provider)
    configurations = [
        _Configuration("bare", [], exporting=False),
        _Configuration("ours, tracing off", [ServerInterceptor()], exporting=False),
        _Configuration("ours, tracing on", [ServerInterceptor()], exporting=True),
        _Configuration(
            "ours + package, off",
            [aio_server_interceptor(tracer_provider=trace.NoOpTracerProvider()), ServerInterceptor()],
            exporting=False,
        ),
        _Configuration(
            "ours + package, on",
            [aio_server_interceptor(tracer_provider=provider), ServerInterceptor()],
            exporting=False,
        ),
    ]
    async with AsyncExitStack() as stack:
        for configuration in configurations:
            await configuration.server.start()
            stack.push_async_callback(configuration.server.stop, None)
        for _ in range(rounds):
            for configuration in configurations:
                await _measure(configuration, requests // rounds)
    provider.shutdown()
    return [(c.name, percentile_ms(c.latencies, 50) or 0.0) for c in configurations]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=4000, help="calls per configuration, over all rounds")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = asyncio.run(run(args.requests, args.rounds))
    bare = results[0][1]
    print(f"{'configuration':<22} {'p50 ms':>8} {'over bare µs':>13}")
    for name, p50 in results:
        print(f"{name:<22} {p50:>8.3f} {1000 * (p50 - bare):>13.1f}")


if __name__ == "__main__":
    main()
