"""OpenTelemetry tracing: W3C trace context in gRPC metadata, spans exported over OTLP.

Off unless an OTLP endpoint is configured; the propagators still carry an incoming trace
context through, so a traced caller's trace survives an untraced hop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

tracer = trace.get_tracer("tensorway")
_exporting = False
TRACE_CONTEXT_HEADER = "traceparent"


def configure(service_name: str, otlp_endpoint: str | None, sample_ratio: float) -> TracerProvider | None:
    """Install an OTLP-exporting tracer provider for this process, when an endpoint is given."""
    global _exporting  # noqa: PLW0603 - one tracer provider per process, as OpenTelemetry has
    if not otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter,
    )

    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: service_name}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    _exporting = True
    return provider


def wanted(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether a call needs a span: this process exports spans, or the caller sent a trace
    context that must reach downstream calls."""
    return _exporting or any(key == TRACE_CONTEXT_HEADER for key, _ in metadata or ())


def sampled() -> bool:
    """Whether the current request's trace is sampled: this process records it, or a caller that
    does asked downstream hops to join it."""
    return trace.get_current_span().get_span_context().trace_flags.sampled


def extract(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The trace context a caller sent in its gRPC metadata."""
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    return propagate.extract(carrier)


def inject() -> list[tuple[str, str]]:
    """Metadata entries that carry the current trace context to a downstream call."""
    if not trace.get_current_span().get_span_context().is_valid:
        # No trace to carry (tracing is off and the caller sent none): skip the propagators,
        # which cost several microseconds on every downstream call.
        return []
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def server_span(
    name: str, metadata: Iterable[tuple[str, str | bytes]] | None, attributes: Mapping[str, str]
) -> AbstractContextManager[trace.Span]:
    """The server span of a call that continues the caller's trace, or a no-op scope when nobody
    traces: spans cost a few microseconds a call."""
    if not wanted(metadata):
        return nullcontext(trace.INVALID_SPAN)
    return tracer.start_as_current_span(
        name,
        context=extract(metadata),
        kind=trace.SpanKind.SERVER,
        attributes=dict(attributes),
        record_exception=False,
        set_status_on_exception=False,
    )
