"""The router's own Prometheus metrics, beside the runtime's per-RPC ones."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ROUTED = Counter(
    "tensorway_router_routed_total",
    "Requests answered by a model version, by model, version and status code.",
    ["model", "version", "grpc_code"],
)
RETRIES = Counter(
    "tensorway_router_retries_total",
    "Retries of a failed attempt on another endpoint, by the code that caused them.",
    ["model", "grpc_code"],
)
RETRIES_DENIED = Counter(
    "tensorway_router_retries_denied_total",
    "Retryable failures returned to the caller because the retry budget was spent.",
    ["model"],
)
SHED = Counter(
    "tensorway_router_shed_total",
    "Requests refused with RESOURCE_EXHAUSTED because the router was at its concurrency limit.",
)
BREAKER_OPEN = Gauge(
    "tensorway_router_breaker_open",
    "1 while an endpoint's circuit breaker is open or half-open, else 0.",
    ["endpoint"],
)
ENDPOINT_CALLS = Counter(
    "tensorway_router_endpoint_calls_total",
    "Calls to an orchestrator endpoint, by status code.",
    ["endpoint", "grpc_code"],
)
ENDPOINT_OUTSTANDING = Gauge(
    "tensorway_router_endpoint_outstanding",
    "Calls in flight to an orchestrator endpoint.",
    ["endpoint"],
)
SHADOW = Counter(
    "tensorway_router_shadow_total",
    "Shadow requests by model, shadow version and outcome: match, mismatch, error or dropped.",
    ["model", "version", "outcome"],
)
ROUTE_REVISION = Gauge(
    "tensorway_router_route_table_revision", "Revision of the route table the router serves."
)
ROUTE_STREAM_UP = Gauge(
    "tensorway_router_route_stream_up", "1 while the WatchRoutes stream to the registry is open."
)
