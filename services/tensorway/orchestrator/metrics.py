"""The orchestrator's Prometheus metrics: per model and per Triton, beside the runtime's RPC metrics.

Requests for models the orchestrator does not know are counted under `UNKNOWN_MODEL`, so a
caller cannot grow the label space with made-up names.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

UNKNOWN_MODEL = "_unknown"
# From a fraction of a millisecond (the orchestrator's own cost) to seconds (big batches, queueing).
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)

REQUEST_SECONDS = Histogram(
    "tensorway_orchestrator_request_seconds",
    "Time from a request's arrival to its answer, queueing included, by model and status code.",
    ["model", "code"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_SECONDS = Histogram(
    "tensorway_orchestrator_queue_seconds",
    "Time a request waited for an in-flight slot before it went to Triton, by model.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
QUEUED = Gauge(
    "tensorway_orchestrator_queued", "Requests waiting for an in-flight slot, by model.", ["model"]
)
IN_FLIGHT = Gauge("tensorway_orchestrator_in_flight", "Requests at Triton now, by model.", ["model"])
ERRORS = Counter(
    "tensorway_orchestrator_errors_total",
    "Requests that failed, by model and error reason (INVALID_ARGUMENT, BACKEND_ERROR...).",
    ["model", "reason"],
)
MODEL_READY = Gauge(
    "tensorway_orchestrator_model_ready", "1 when at least one Triton has the model ready.", ["model"]
)
TRITON_READY = Gauge(
    "tensorway_orchestrator_triton_ready", "1 when the Triton answers that it is live.", ["triton"]
)
STREAMS_OPENED = Counter(
    "tensorway_orchestrator_streams_opened_total",
    "ModelStreamInfer streams opened, by Triton; growth beyond the configured count means reconnects.",
    ["triton"],
)
