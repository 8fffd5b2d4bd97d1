"""Settings every tensorway server shares. Each service subclasses `ServiceSettings` with its
own env prefix (`TENSORWAY_<SERVICE>_...`), builds it in `main()` and passes it in."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """The server runtime's settings; services add their own fields."""

    model_config = SettingsConfigDict(env_prefix="TENSORWAY_", extra="ignore")

    host: str = "127.0.0.1"
    """Address the gRPC server binds."""
    port: int = 0
    """gRPC port; 0 takes a free one."""
    metrics_enabled: bool = True
    """Serve Prometheus metrics over HTTP."""
    metrics_port: int = 0
    """Prometheus port; 0 takes a free one."""
    grace: timedelta = timedelta(seconds=5)
    """How long in-flight RPCs may finish after a shutdown signal."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message accepted or sent; larger ones get RESOURCE_EXHAUSTED."""
    otlp_endpoint: str | None = None
    """OTLP/gRPC collector address (e.g. http://127.0.0.1:4317); tracing is off when unset."""
    trace_sample_ratio: float = 0.01
    """Share of new traces sampled (1 %); a caller's sampled or not-sampled `traceparent` is always
    followed. A sampled request reaches Triton as a unary ModelInfer instead of on the
    orchestrator's persistent streams, so the share is kept small; a client asks for one request's
    trace with `x-client-trace-id` through Envoy, or a sampled `traceparent` sent to a router."""
    log_level: str = "INFO"
    """Root log level."""
    log_json: bool = True
    """JSON logs for pipelines; false gives plain text for a terminal."""
    heap_retained_bytes: int = Field(default=64 * 1024 * 1024, ge=0, lt=2**31)
    """Freed C-heap memory the process keeps for reuse instead of giving it back to the kernel
    (glibc only; see `tensorway.runtime.heap`). Large tensors then cost no page faults on every
    hop, and the resident memory may stay up to this much above what is in use after a burst of
    them. 0 keeps glibc's defaults; at most 2 GiB less a byte (glibc takes a C int)."""
