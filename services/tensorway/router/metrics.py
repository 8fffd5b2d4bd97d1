"""The router's own Prometheus metrics, beside the runtime's per-RPC ones."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ROUTED = Counter(
    "tensorway_router_routed_total",
    "Requests answered by a model version, by model, version and status code.",
    ["model", "version", "grpc_code"],
)
REQUEST_SECONDS = Histogram(
    "tensorway_router_request_seconds",
    "Time from a request's arrival at the router to its answer, retries included.",
    ["model", "version", "grpc_code"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REQUEST_BYTES = Counter(
    "tensorway_router_request_bytes_total",
    "Serialized InferRequest bytes received, by model and the version that ran them.",
    ["model", "version"],
)
RESPONSE_BYTES = Counter(
    "tensorway_router_response_bytes_total",
    "Serialized InferResponse bytes returned, by model and version.",
    ["model", "version"],
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
BREAKER_TRIPS = Counter(
    "tensorway_router_breaker_trips_total",
    "Times an endpoint's circuit breaker opened (the endpoint was ejected).",
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
