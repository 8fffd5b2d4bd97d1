"""A real OTLP trace receiver for tests: OTLP/gRPC (what the tensorway services export) and
OTLP/HTTP (the only protocol Triton's exporter speaks; it sends JSON), both collecting into
one list of spans."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _json_attributes(attributes: list[dict[str, Any]]) -> dict[str, Any]:
    # OTLP/JSON: {"key": k, "value": {"stringValue": v}}, 64-bit integers as strings.
    return {item["key"]: next(iter(item["value"].values()), None) for item in attributes}


def _spans_of_json(body: dict[str, Any]) -> list[ReceivedSpan]:
    received = []
    for resource_spans in body.get("resourceSpans", []):
        resource = _json_attributes(resource_spans.get("resource", {}).get("attributes", []))
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                received.append(
                    ReceivedSpan(
                        service=str(resource.get("service.name", "")),
                        name=span["name"],
                        # OTLP/JSON writes ids as hex, unlike protobuf's JSON mapping (base64).
                        trace_id=span["traceId"],
                        span_id=span["spanId"],
                        parent_span_id=span.get("parentSpanId", ""),
                        attributes=_json_attributes(span.get("attributes", [])),
                    )
                )
    return received


@dataclass
class SpanStore:
    spans: list[ReceivedSpan] = field(default_factory=list)
    exports: Counter[str] = field(default_factory=Counter)
    """Export requests received, by protocol ("grpc", "http")."""
    refused: list[str] = field(default_factory=list)
    """Why the HTTP receiver refused an export it could not read (its spans are lost)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> dict[str, Any]:
        """For failure messages: what reached the receiver, so a span that never arrived can be
        told from one that arrived unlinked."""
        with self._lock:
            return {
                "exports": dict(self.exports),
                "spans by service": dict(Counter(span.service for span in self.spans)),
                "refused": self.refused[-3:],
            }

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest, protocol: str = "grpc") -> None:
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = {item.key: _value(item.value) for item in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={item.key: _value(item.value) for item in span.attributes},
                        )
                    )
        self.extend(received, protocol)

    def extend(self, received: list[ReceivedSpan], protocol: str = "grpc") -> None:
        with self._lock:
            self.exports[protocol] += 1
            self.spans.extend(received)

    def wait_for(
        self, done: Callable[[list[ReceivedSpan]], bool], timeout: float = 60.0
    ) -> list[ReceivedSpan]:
        """The spans received once `done` holds for them; the spans so far after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            if done(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: SpanStore) -> None:
        self._store = store

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._store.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def _http_handler(store: SpanStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            try:
                if self.headers.get("Content-Type", "").startswith("application/json"):
                    store.extend(_spans_of_json(json.loads(body)), "http")
                else:
                    store.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body), "http")
            except Exception as error:
                store.refused.append(f"{type(error).__name__}: {error} ({len(body)} bytes)")
                self.send_error(400)
                return
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the test reads spans, not request logs."""

    return Handler


@dataclass(frozen=True)
class OtlpReceiver:
    store: SpanStore
    grpc_endpoint: str
    """``http://host:port`` for OTLP/gRPC exporters."""
    http_traces_url: str
    """``http://host:port/v1/traces`` for OTLP/HTTP exporters."""


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """Both receivers on free loopback ports, stopped on exit."""
    store = SpanStore()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(store), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    http = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(store))
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield OtlpReceiver(
            store=store,
            grpc_endpoint=f"http://127.0.0.1:{grpc_port}",
            http_traces_url=f"http://127.0.0.1:{http.server_port}/v1/traces",
        )
    finally:
        http.shutdown()
        http.server_close()
        thread.join()
        server.stop(grace=None)
