"""The local mesh, traced and scraped: one request's trace crosses router, orchestrator and
Triton; every service's metrics match the catalogue (docs/metrics.md); the local Prometheus
scrapes every service and can evaluate the rules and every dashboard query."""

from __future__ import annotations

import json
import secrets
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families

from tensorway.devstack import DevStackSettings, Stack, StackState, demo_request, register_demo_models
from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tensorway.inference.v1 import inference_service_pb2_grpc as inference_grpc
from tests.tempdirs import world_searchable_temp_dir

from .catalogue import OBSERVABILITY, CatalogueEntry
from .conftest import debian_prometheus_binary
from .otlp import OtlpReceiver, ReceivedSpan, otlp_receiver

TRACED_SERVICES = ("registry", "orchestrator", "router")
REQUESTS = 5


@dataclass(frozen=True)
class Sample:
    series: str
    """The catalogue name: a counter's `_total` name, a histogram's base name."""
    sample: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class ObservedMesh:
    stack: Stack
    state: StackState
    receiver: OtlpReceiver


@pytest.fixture(scope="module")
def mesh() -> Iterator[ObservedMesh]:
    """Registry, orchestrator, router and Triton exporting spans to a receiver, scraped by
    Prometheus, with the demo models registered and some traffic sent."""
    debian_prometheus_binary("prometheus")
    state_dir = world_searchable_temp_dir("tensorway-test-observability-")
    with otlp_receiver() as receiver, pytest.MonkeyPatch.context() as env:
        for service in TRACED_SERVICES:
            env.setenv(f"TENSORWAY_{service.upper()}_OTLP_ENDPOINT", receiver.grpc_endpoint)
        # Triton joins a request's trace only from the request's own gRPC metadata, which a
        # shared ModelStreamInfer stream cannot carry: unary calls to Triton.
        env.setenv("TENSORWAY_ORCHESTRATOR_STREAMS_PER_TRITON", "0")
        # Spans leave the services within a fifth of a second instead of five.
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        settings = DevStackSettings(
            state_dir=state_dir,
            triton_otlp_traces_url=receiver.http_traces_url,
            prometheus_scrape_interval=timedelta(seconds=1),
        ).without_pinned_ports()
        stack = Stack(settings, state_dir=state_dir, die_with_parent=True)
        try:
            stack.up(["router"])
            state = stack.up(["prometheus"])
            register_demo_models(state)
            _send_traffic(state)
            yield ObservedMesh(stack, state, receiver)
        finally:
            stack.down()
            shutil.rmtree(state_dir, ignore_errors=True)


def _send_traffic(state: StackState) -> None:
    router = state.addresses()["router"]
    for _ in range(REQUESTS):
        demo_request(router)
    # The Triton API of the router, as an existing Triton client uses it.
    client = triton.InferenceServerClient(router)
    pixels = triton.InferInput("input", [2, 64], "FP32")
    pixels.set_data_from_numpy(np.zeros((2, 64), dtype=np.float32))
    client.infer("digits", [pixels])
    client.close()


def _metrics_urls(state: StackState) -> dict[str, str]:
    return {
        name: record.internal["metrics"]
        for name, record in state.components.items()
        if "metrics" in record.internal
    }


def _scrape(url: str) -> list[Sample]:
    # Loopback URL the stack recorded for one of its own servers.
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    # The parser names every counter's samples `_total`; Prometheus keeps a counter's name as its
    # TYPE line gives it (Triton's have no `_total`), and that is the name queries use.
    typed = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    samples = []
    for family in text_string_to_metric_families(text):
        series = family.name
        if family.type == "counter" and f"{family.name}_total" in typed:
            series = f"{family.name}_total"
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # the client library's creation timestamps, not a series of ours
            labels = {key: value for key, value in sample.labels.items() if key != "le"}
            samples.append(Sample(series, sample.name, labels, sample.value))
    return samples


def _value(samples: list[Sample], sample: str, **labels: str) -> float:
    """The sum over samples of that name (as the client parser names them) whose labels include `labels`."""
    matching = [s.value for s in samples if s.sample == sample and labels.items() <= s.labels.items()]
    assert matching, f"no {sample} with {labels}"
    return sum(matching)


def test_metrics_match_the_catalogue(mesh: ObservedMesh, catalogue: dict[str, CatalogueEntry]) -> None:
    urls = _metrics_urls(mesh.state)
    assert {*TRACED_SERVICES, "triton"} <= urls.keys()
    scraped = {name: _scrape(url) for name, url in urls.items()}
    for component, samples in scraped.items():
        exported = {sample.series for sample in samples}
        ours = {series for series in exported if series.startswith("tensorway_")}
        assert ours <= catalogue.keys(), f"{component} exports series docs/metrics.md does not list"
        for sample in samples:
            entry = catalogue.get(sample.series)
            if entry is None:
                continue
            assert component in entry.exporters, f"{sample.series} from {component}: fix 'Exported by'"
            assert sample.labels.keys() == entry.labels, f"{sample.sample} labels differ from the catalogue"
            if entry.kind in ("counter", "histogram"):
                assert sample.value >= 0, sample
        expected = {
            name
            for name, entry in catalogue.items()
            if component in entry.exporters and entry.present in ("always", "traffic")
        }
        assert expected - exported == set(), f"{component} lacks catalogued series"

    # The values tell the story of the traffic sent.
    router, orchestrator, registry = scraped["router"], scraped["orchestrator"], scraped["registry"]
    infer = {"grpc_method": "Infer", "grpc_code": "OK"}
    assert _value(router, "tensorway_grpc_server_handled_total", **infer) >= REQUESTS
    assert _value(router, "tensorway_grpc_server_handling_seconds_count", **infer) >= REQUESTS
    assert (
        _value(router, "tensorway_grpc_server_handled_total", grpc_method="ModelInfer", grpc_code="OK") == 1
    )
    assert _value(router, "tensorway_grpc_server_in_flight", grpc_method="Infer") == 0
    assert (
        _value(router, "tensorway_router_routed_total", model="simple", version="1", grpc_code="OK")
        >= REQUESTS
    )
    assert _value(router, "tensorway_router_shed_total") == 0
    endpoint = mesh.state.addresses()["orchestrator"]
    assert _value(router, "tensorway_router_breaker_open", endpoint=endpoint) == 0
    assert _value(router, "tensorway_router_endpoint_outstanding", endpoint=endpoint) == 0
    assert (
        _value(router, "tensorway_router_endpoint_calls_total", endpoint=endpoint, grpc_code="OK")
        >= REQUESTS + 1
    )
    assert _value(router, "tensorway_router_route_stream_up") == 1
    assert _value(router, "tensorway_router_route_table_revision") > 0
    assert (
        _value(orchestrator, "tensorway_orchestrator_request_seconds_count", model="simple", code="OK")
        >= REQUESTS
    )
    assert _value(orchestrator, "tensorway_orchestrator_queue_seconds_count", model="digits") >= 1
    assert _value(orchestrator, "tensorway_orchestrator_in_flight", model="simple") == 0
    for model in ("simple", "digits", "iris"):
        assert _value(orchestrator, "tensorway_orchestrator_model_ready", model=model) == 1
    assert (
        _value(
            orchestrator, "tensorway_orchestrator_triton_ready", triton=mesh.state.addresses()["triton_grpc"]
        )
        == 1
    )
    assert _value(registry, "tensorway_registry_cache_lookups_total") > 0
    assert _value(registry, "tensorway_registry_redis_errors_total") == 0
    assert _value(scraped["triton"], "nv_inference_request_success_total", model="simple") >= REQUESTS
    assert _value(scraped["triton"], "nv_inference_count_total", model="digits") >= 2


def _infer_with_trace(router: str, traceparent: str) -> None:
    request = inference_pb.InferRequest(model_name="iris")
    features = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4], raw_contents=features.tobytes())
    with grpc.insecure_channel(router) as channel:
        inference_grpc.InferenceServiceStub(channel).Infer(
            request, metadata=[("traceparent", traceparent)], timeout=10
        )


def _traced(mesh: ObservedMesh) -> tuple[str, list[ReceivedSpan]]:
    """The caller's span id and the trace's spans, for one fresh request with a sampled traceparent."""
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    _infer_with_trace(mesh.state.addresses()["router"], f"00-{trace_id}-{caller_span}-01")

    def complete(spans: list[ReceivedSpan]) -> bool:
        services = {span.service for span in spans if span.trace_id == trace_id}
        return {"router", "orchestrator", "triton"} <= services and len(
            [span for span in spans if span.trace_id == trace_id and span.service == "triton"]
        ) >= 3

    spans = mesh.receiver.store.wait_for(complete)
    return caller_span, [span for span in spans if span.trace_id == trace_id]


def test_one_trace_covers_router_orchestrator_and_triton(mesh: ObservedMesh) -> None:
    caller_span, spans = _traced(mesh)
    by_service: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        by_service.setdefault(span.service, []).append(span)
    assert {"router", "orchestrator", "triton"} <= by_service.keys(), spans

    # router ← the caller; orchestrator ← router; Triton's request span ← orchestrator.
    (router,) = [span for span in by_service["router"] if span.name.endswith("/Infer")]
    assert router.parent_span_id == caller_span
    assert router.attributes["rpc.service"] == "tensorway.inference.v1.InferenceService"
    (orchestrator,) = [span for span in by_service["orchestrator"] if span.name.endswith("/Infer")]
    assert orchestrator.parent_span_id == router.span_id
    triton_spans = {span.name: span for span in by_service["triton"]}
    assert {"InferRequest", "iris", "compute"} <= triton_spans.keys()
    assert triton_spans["InferRequest"].parent_span_id == orchestrator.span_id
    assert triton_spans["iris"].parent_span_id == triton_spans["InferRequest"].span_id
    assert triton_spans["iris"].attributes["triton.model_name"] == "iris"
    assert triton_spans["compute"].parent_span_id == triton_spans["iris"].span_id


def test_router_span_records_the_routing_decision(mesh: ObservedMesh) -> None:
    _, spans = _traced(mesh)
    (router,) = [span for span in spans if span.service == "router" and span.name.endswith("/Infer")]
    assert router.attributes.get("tensorway.route.version") == "1"
    assert router.attributes.get("tensorway.route.endpoint") == mesh.state.addresses()["orchestrator"]


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        # Loopback URL of the stack's own Prometheus.
        with urllib.request.urlopen(url, timeout=5) as reply:
            answer = json.load(reply)
    except urllib.error.HTTPError as error:
        pytest.fail(f"Prometheus refused {expr!r}: {error.read().decode()}")
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def _wait_for(prometheus: str, expr: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not (result := _query(prometheus, expr)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return result


def _dashboard_queries() -> list[str]:
    # Grafana's variables, as a user viewing the demo model would have them.
    values = {"$__rate_interval": "1m", "$model": "simple", "$version": ".*"}
    queries = []
    for path in sorted((OBSERVABILITY / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in values.items():
                    expr = expr.replace(variable, value)
                queries.append(expr)
    return queries


def test_prometheus_scrapes_every_service(mesh: ObservedMesh) -> None:
    prometheus = mesh.state.endpoints()["prometheus"].url
    assert prometheus is not None
    jobs = set(_metrics_urls(mesh.state))
    up = _wait_for(prometheus, f"count(up == 1) == {len(jobs)}")
    assert up, _query(prometheus, "up")
    assert {sample["metric"]["job"] for sample in _query(prometheus, "up == 1")} == jobs
    # The mesh's rules are loaded: a recording rule over the router's series has a value.
    assert _wait_for(prometheus, "tensorway:router_infer_requests:rate5m")
    # Every dashboard query is valid PromQL against the real series.
    for expr in _dashboard_queries():
        _query(prometheus, expr)
