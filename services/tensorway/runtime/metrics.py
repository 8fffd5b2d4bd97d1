"""Standard RPC metrics for every tensorway server, and the Prometheus endpoint that serves them.

Names and labels follow the go-grpc-prometheus conventions, prefixed `tensorway_`, so the
usual dashboards and alert rules for gRPC servers read them unchanged.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

HANDLED = Counter(
    "tensorway_grpc_server_handled_total",
    "RPCs completed on the server, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
HANDLING_SECONDS = Histogram(
    "tensorway_grpc_server_handling_seconds",
    "Time from an RPC's arrival to its status, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
    # Sub-millisecond buckets: a mesh hop is meant to cost well under a millisecond.
    buckets=(
        0.0001,
        0.00025,
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
        10,
        30,
    ),
)
IN_FLIGHT = Gauge(
    "tensorway_grpc_server_in_flight",
    "RPCs being handled now, by method.",
    ["grpc_service", "grpc_method"],
)


def start_metrics_server(host: str, port: int) -> tuple[WSGIServer, int]:
    """Serve /metrics on (host, port); port 0 takes a free port, which is returned."""
    server, _thread = start_http_server(port, addr=host)
    return server, server.server_port
