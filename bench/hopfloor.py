"""The floor of a hop: what one Python process in the request path costs with no logic at all.

A bare `grpc.aio` proxy that forwards every unary call's bytes to one upstream (no parsing, no
routing, no metrics, no tracing, no interceptors), run as its own process as the mesh's services
are, with their C heap settings; two chained are the floor of router + orchestrator. And for
the edge, Envoy routing gRPC straight to the router with no filters (no JWT, no limits, no
transcoding, no access log): the floor of the edge's own hop. The benchmarks measure these in
the same run as the mesh and read every mesh row against its floor.

    .venv/bin/python bench/hopfloor.py --port PORT --upstream HOST:PORT   (one proxy, until killed)
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from benchkit import free_port, stop, wait_serving
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tensorway.runtime import ServiceSettings
from tensorway.runtime.heap import retain_freed_memory

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]
# Forwarded: inference and everything else of the two APIs; health is the proxy's own.
_FORWARDED = ("/inference.", "/tensorway.")


class _Forward(grpc.GenericRpcHandler):
    """Every unary method of the upstream, bytes in, bytes out."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._methods: dict[str, Any] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if not method.startswith(_FORWARDED):
            return None
        call = self._methods.get(method)
        if call is None:
            call = self._methods[method] = self._channel.unary_unary(method)

        async def forward(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            try:
                answer: bytes = await call(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as error:
                await context.abort(error.code(), error.details() or "")
            return answer

        return grpc.unary_unary_rpc_method_handler(forward)


async def _serve(port: int, upstream: str) -> None:
    channel = grpc.aio.insecure_channel(upstream, options=_OPTIONS[:2])
    server = grpc.aio.server(options=_OPTIONS)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((_Forward(channel),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


@contextmanager
def bare_proxy(upstream: str, log: Path) -> Iterator[str]:
    """One bare proxy to `upstream` as its own process until the block ends; yields its address."""
    port = free_port()
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, __file__, "--port", str(port), "--upstream", upstream],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, process)
        yield address
    finally:
        stop(process)


_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
BARE_ENVOY_CONFIG = """\
static_resources:
  listeners:
  - name: bare
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: bare
          codec_type: HTTP2
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: upstream, timeout: 30s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {host}, port_value: {upstream_port}}}}}}}
"""


@contextmanager
def bare_envoy(envoy: Path, upstream: str, workdir: Path) -> Iterator[str]:
    """Envoy with only its router filter, plaintext HTTP/2 in and out, in front of `upstream`, as
    its own process (one worker, as the mesh's Envoy runs); yields its address."""
    port = free_port()
    host, upstream_port = upstream.rsplit(":", 1)
    config = workdir / "bare-envoy.yaml"
    config.write_text(BARE_ENVOY_CONFIG.format(port=port, host=host, upstream_port=upstream_port, hcm=_HCM))
    with (workdir / "bare-envoy.log").open("ab") as output:
        process = subprocess.Popen(
            [str(envoy), "-c", str(config), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, process)  # the upstream's health, through Envoy
        yield address
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    # The C heap as the mesh's services keep it, so the floor pays for large tensors what they do.
    retain_freed_memory(ServiceSettings().heap_retained_bytes)
    asyncio.run(_serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
