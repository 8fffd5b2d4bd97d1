"""The local mesh with its shipped defaults, traced and scraped: a request whose client asks for
its trace (x-client-trace-id through Envoy, or a sampled traceparent) is traced across Envoy,
router, orchestrator and Triton, and a batch row's across Kafka too, while a request whose trace
is not sampled stays on the orchestrator's streams and leaves no span; every service's metrics
match the catalogue (docs/metrics.md); the local Prometheus scrapes every service and can
evaluate the rules and every dashboard query."""

from __future__ import annotations

import json
import secrets
import shutil
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families

from tensorway.batch.v1 import batch_service_pb2 as batch_pb
from tensorway.batch.v1 import batch_service_pb2_grpc as batch_grpc
from tensorway.devstack import DevStackSettings, Stack, StackState, demo_request, register_demo_models
from tensorway.devstack._envoy import Envoy, jwt_key_dir, local_certificates
from tensorway.devstack._stack import default_components
from tensorway.edge.config import load_values
from tensorway.edge.keys import PRIVATE_KEY_FILE, mint_token
from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tensorway.inference.v1 import inference_service_pb2_grpc as inference_grpc
from tensorway.runtime.context import Scope
from tests.tempdirs import world_searchable_temp_dir
from tests.waiting import PATIENCE, eventually_blocking

from .catalogue import OBSERVABILITY, CatalogueEntry
from .conftest import debian_prometheus_binary
from .otlp import OtlpReceiver, ReceivedSpan, otlp_receiver

TRACED_SERVICES = ("registry", "orchestrator", "router", "batch", "batch-worker")
# The services whose metrics the catalogue's "Exported by" names one process each; its `batch`
# stands for the batch API and its workers together, which the mesh runs as two processes.
CATALOGUED = ("registry", "orchestrator", "router")
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
    state_dir: Path
    receiver: OtlpReceiver


@pytest.fixture(scope="module")
def mesh() -> Iterator[ObservedMesh]:
    """Registry, orchestrator, router and Triton exporting spans to a receiver, scraped by
    Prometheus, with the demo models registered and some traffic sent."""
    debian_prometheus_binary("prometheus")
    state_dir = world_searchable_temp_dir("tensorway-test-observability-")
    with otlp_receiver() as receiver, pytest.MonkeyPatch.context() as env:
        for service in TRACED_SERVICES:
            env.setenv(f"TENSORWAY_{service.upper().replace('-', '_')}_OTLP_ENDPOINT", receiver.grpc_endpoint)
        # The services sample new traces at their default ratio (no TRACE_SAMPLE_RATIO set).
        # Spans leave the services within a fifth of a second instead of five.
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        settings = DevStackSettings(
            state_dir=state_dir,
            triton_otlp_traces_url=receiver.http_traces_url,
            prometheus_scrape_interval=timedelta(seconds=1),
        ).without_pinned_ports()
        collector = urllib.parse.urlsplit(receiver.grpc_endpoint)
        # Envoy traced as compose and Kubernetes ship it (random sampling included), exporting to
        # the receiver.
        shipped = load_values("compose")["tracing"]
        traced_envoy = Envoy(
            values={
                "tracing": {
                    "collector_host": collector.hostname,
                    "collector_port": collector.port,
                    "random_sampling": shipped["random_sampling"],
                }
            }
        )
        components = [traced_envoy if c.name == "envoy" else c for c in default_components()]
        stack = Stack(settings, state_dir=state_dir, components=components, die_with_parent=True)
        try:
            stack.up(["router", "batch", "batch-worker", "envoy"])
            state = stack.up(["prometheus"])
            register_demo_models(state, timeout=PATIENCE)
            _send_traffic(state)
            yield ObservedMesh(stack, state, state_dir, receiver)
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
    assert {*CATALOGUED, "triton"} <= urls.keys()
    scraped = {name: _scrape(urls[name]) for name in (*CATALOGUED, "triton")}
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


def _iris_request() -> inference_pb.InferRequest:
    request = inference_pb.InferRequest(model_name="iris")
    features = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4], raw_contents=features.tobytes())
    return request


def _infer_with_trace(router: str, traceparent: str) -> None:
    with grpc.insecure_channel(router) as channel:
        inference_grpc.InferenceServiceStub(channel).Infer(
            _iris_request(), metadata=[("traceparent", traceparent)], timeout=10
        )


def _trace_of(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.trace_id == trace_id]


def _with_triton(spans: list[ReceivedSpan]) -> bool:
    """Whether a trace holds the router's, the orchestrator's and Triton's three spans."""
    services = {span.service for span in spans}
    triton = [span for span in spans if span.service == "triton"]
    return {"router", "orchestrator"} <= services and len(triton) >= 3


# Triton's exporter drops a batch of spans now and then on a loaded machine (tracing is best
# effort), so a trace whose Triton spans never come is tried again with a fresh request, a few times.
TRACE_TRIES = 3


T = TypeVar("T")
# Finds a complete trace (or what a test wants of it) among the received spans.
Finder = Callable[[list[ReceivedSpan]], T | None]


def _retried(
    mesh: ObservedMesh, attempt: Callable[[], tuple[Finder[T], Callable[[list[ReceivedSpan]], object]]]
) -> tuple[T, list[ReceivedSpan]]:
    """What a traced request or job finds among the received spans, and the spans. `attempt()`
    makes one and returns how to find its complete trace and how to describe what came instead;
    tried up to TRACE_TRIES times, each try with a fresh request."""
    incomplete = []
    for _ in range(TRACE_TRIES):
        find, explain = attempt()
        spans = mesh.receiver.store.wait_for(lambda spans, find=find: find(spans) is not None, timeout=30)
        found = find(spans)
        if found is not None:
            return found, spans
        incomplete.append(explain(spans))
    raise AssertionError(incomplete, mesh.receiver.store.summary())


def _traced(mesh: ObservedMesh) -> tuple[str, list[ReceivedSpan]]:
    """The caller's span id and the trace's spans, for one fresh request with a sampled traceparent."""

    def attempt() -> tuple[Finder[tuple[str, list[ReceivedSpan]]], Callable[[list[ReceivedSpan]], object]]:
        trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
        _infer_with_trace(mesh.state.addresses()["router"], f"00-{trace_id}-{caller_span}-01")

        def find(spans: list[ReceivedSpan]) -> tuple[str, list[ReceivedSpan]] | None:
            trace = _trace_of(spans, trace_id)
            return (caller_span, trace) if _with_triton(trace) else None

        return find, lambda spans: [(s.service, s.name) for s in _trace_of(spans, trace_id)]

    found, _ = _retried(mesh, attempt)
    return found


def _shard_traces(spans: list[ReceivedSpan], job_id: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """For a failure message: each of the job's shard spans' traces as (service, name, span id,
    parent id) rows, so a missing span or a broken link shows."""
    shards = [
        s for s in spans if s.name == "batch shard" and s.attributes.get("tensorway.batch.job") == job_id
    ]
    return {
        shard.trace_id: [
            (s.service, s.name, s.span_id, s.parent_span_id) for s in _trace_of(spans, shard.trace_id)
        ]
        for shard in shards
    }


def _only(spans: list[ReceivedSpan], service: str, name_suffix: str) -> ReceivedSpan:
    (span,) = [span for span in spans if span.service == service and span.name.endswith(name_suffix)]
    return span


def _is_descendant(spans: list[ReceivedSpan], span: ReceivedSpan, ancestor: ReceivedSpan) -> bool:
    by_id = {candidate.span_id: candidate for candidate in spans}
    parent = by_id.get(span.parent_span_id)
    while parent is not None:
        if parent.span_id == ancestor.span_id:
            return True
        parent = by_id.get(parent.parent_span_id)
    return False


def _assert_inference_chain(spans: list[ReceivedSpan], caller: ReceivedSpan, model: str) -> None:
    """router <- caller; orchestrator <- router; Triton's request, model and compute spans under
    the orchestrator's."""
    router = _only(spans, "router", "/Infer")
    assert router.parent_span_id == caller.span_id
    assert router.attributes["rpc.service"] == "tensorway.inference.v1.InferenceService"
    orchestrator = _only(spans, "orchestrator", "/Infer")
    assert orchestrator.parent_span_id == router.span_id
    triton_spans = {span.name: span for span in spans if span.service == "triton"}
    assert {"InferRequest", model, "compute"} <= triton_spans.keys()
    assert _is_descendant(spans, triton_spans["InferRequest"], orchestrator)
    assert triton_spans[model].parent_span_id == triton_spans["InferRequest"].span_id
    assert triton_spans[model].attributes["triton.model_name"] == model
    assert triton_spans["compute"].parent_span_id == triton_spans[model].span_id


def _edge_token(mesh: ObservedMesh, *scopes: Scope) -> str:
    jwt = load_values("local")["jwt"]
    return mint_token(
        jwt_key_dir(mesh.state_dir) / PRIVATE_KEY_FILE,
        tenant="tracer",
        scopes=scopes,
        issuer=jwt["issuer"],
        audience=jwt["audiences"][0],
        ttl=timedelta(minutes=10),
    )


def _edge_channel(mesh: ObservedMesh) -> grpc.Channel:
    ca = local_certificates(mesh.state_dir).ca.read_bytes()
    return grpc.secure_channel(mesh.state.addresses()["envoy"], grpc.ssl_channel_credentials(ca))


def _envoy_roots(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    """Envoy's spans that start a trace, by trace id."""
    return {span.trace_id: span for span in spans if span.service == "envoy" and not span.parent_span_id}


def _envoy_spans(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [span for span in spans if span.service == "envoy"]


def _infer_through_envoy(mesh: ObservedMesh, *metadata: tuple[str, str]) -> None:
    token = _edge_token(mesh, Scope.INFER)
    with _edge_channel(mesh) as channel:
        inference_grpc.InferenceServiceStub(channel).Infer(
            _iris_request(), metadata=[("authorization", f"Bearer {token}"), *metadata], timeout=10
        )


def test_a_client_asks_envoy_for_its_trace_with_x_client_trace_id(mesh: ObservedMesh) -> None:
    """At the shipped sampling (1 % at random), a client that sends x-client-trace-id through
    Envoy gets its request traced (client_sampling, 100 %): Envoy's span, tagged with the client's
    id, is the root, and Triton's spans are under the orchestrator's."""

    def traced_inference(spans: list[ReceivedSpan], client_trace_id: str) -> list[ReceivedSpan] | None:
        for envoy in _envoy_roots(spans).values():
            if envoy.attributes.get("guid:x-client-trace-id") == client_trace_id:
                trace = _trace_of(spans, envoy.trace_id)
                return trace if _with_triton(trace) else None
        return None

    def attempt() -> tuple[Finder[list[ReceivedSpan]], Callable[[list[ReceivedSpan]], object]]:
        client_trace_id = uuid.uuid4().hex
        _infer_through_envoy(mesh, ("x-client-trace-id", client_trace_id))
        return lambda spans: traced_inference(spans, client_trace_id), _envoy_spans

    trace, _ = _retried(mesh, attempt)
    (envoy,) = [span for span in trace if span.service == "envoy"]
    assert not envoy.parent_span_id
    _assert_inference_chain(trace, envoy, "iris")


def test_x_client_trace_id_beside_a_sampled_traceparent(mesh: ObservedMesh) -> None:
    """Envoy 1.40 does not trace a request for its sampled traceparent alone (its own sampling
    decides: measured, a sampled traceparent through Envoy left no span at 1 %); with
    x-client-trace-id beside it the request is traced, in the client's trace, under its span."""

    def envoy_span(spans: list[ReceivedSpan], client_trace_id: str) -> ReceivedSpan | None:
        tagged = [
            span
            for span in spans
            if span.service == "envoy" and span.attributes.get("guid:x-client-trace-id") == client_trace_id
        ]
        return tagged[0] if tagged and _with_triton(_trace_of(spans, tagged[0].trace_id)) else None

    sent: list[tuple[str, str]] = []

    def attempt() -> tuple[Finder[ReceivedSpan], Callable[[list[ReceivedSpan]], object]]:
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        client_trace_id = uuid.uuid4().hex
        _infer_through_envoy(
            mesh,
            ("traceparent", f"00-{trace_id}-{client_span}-01"),
            ("x-client-trace-id", client_trace_id),
        )
        sent.append((trace_id, client_span))
        return lambda spans: envoy_span(spans, client_trace_id), _envoy_spans

    envoy, spans = _retried(mesh, attempt)
    trace_id, client_span = sent[-1]
    assert (envoy.trace_id, envoy.parent_span_id) == (trace_id, client_span)
    _assert_inference_chain(_trace_of(spans, trace_id), envoy, "iris")


def test_an_unsampled_request_leaves_no_span_and_stays_on_the_stream(mesh: ObservedMesh) -> None:
    """A request whose trace is not sampled, as nearly every request is at the default ratio
    (0.01): neither router, orchestrator nor Triton records a span of it, and the orchestrator
    sends it on its persistent ModelStreamInfer stream. A traceparent that says not-sampled, sent
    to the router, makes the decision deterministic (the services' ParentBased sampler follows
    it), where a request without one would be sampled 1 time in 100."""
    direct = secrets.token_hex(16)
    _infer_with_trace(mesh.state.addresses()["router"], f"00-{direct}-{secrets.token_hex(8)}-00")
    # A sampled request sent after it: once its Triton spans have arrived, any span of the one
    # before it (Triton's come out in order, the services' sooner) would have too.
    _traced(mesh)
    spans = mesh.receiver.store.wait_for(lambda spans: True, timeout=0)
    assert _trace_of(spans, direct) == []
    # Not sampled at the orchestrator, so not sent unary (TritonEndpoint.infer): the stream to
    # Triton is open and carried it.
    orchestrator = _scrape(_metrics_urls(mesh.state)["orchestrator"])
    assert (
        _value(
            orchestrator,
            "tensorway_orchestrator_streams_opened_total",
            triton=mesh.state.addresses()["triton_grpc"],
        )
        >= 1
    )


def test_a_caller_trace_covers_router_orchestrator_and_triton(mesh: ObservedMesh) -> None:
    caller_span, spans = _traced(mesh)
    caller = ReceivedSpan("caller", "caller", spans[0].trace_id, caller_span, "", {})
    _assert_inference_chain(spans, caller, "iris")


def test_router_span_records_the_routing_decision(mesh: ObservedMesh) -> None:
    _, spans = _traced(mesh)
    router = _only(spans, "router", "/Infer")
    assert router.attributes.get("tensorway.route.version") == "1"
    assert router.attributes.get("tensorway.route.endpoint") == mesh.state.addresses()["orchestrator"]


def _traced_job(mesh: ObservedMesh, auth: list[tuple[str, str]]) -> str:
    """The id of a finished 4-row job submitted through Envoy with x-client-trace-id."""
    rows = np.random.default_rng(7).integers(0, 17, (4, 64)).astype(np.float32)
    body = "".join(
        json.dumps({"id": i, "inputs": {"input": row.tolist()}}) + "\n" for i, row in enumerate(rows)
    )
    with _edge_channel(mesh) as channel:
        batch = batch_grpc.BatchServiceStub(channel)
        upload = batch.CreateUpload(
            batch_pb.CreateUploadRequest(file_name="rows.jsonl", size_bytes=len(body)),
            metadata=auth,
            timeout=10,
        )
        put = urllib.request.Request(upload.upload_url, data=body.encode(), method="PUT")
        # Loopback URL of the stack's own S3, presigned by the batch API.
        with urllib.request.urlopen(put, timeout=10):
            pass
        # The client asks for the job's trace, as a user would: x-client-trace-id through Envoy.
        job = batch.CreateJob(
            batch_pb.CreateJobRequest(
                job=batch_pb.Job(model="digits", input_uri=upload.input_uri), request_id=uuid.uuid4().hex
            ),
            metadata=[*auth, ("x-client-trace-id", uuid.uuid4().hex)],
            timeout=10,
        ).job

        def ended() -> batch_pb.Job | None:
            current = batch.GetJob(batch_pb.GetJobRequest(name=job.name), metadata=auth, timeout=10).job
            running = (batch_pb.JOB_STATE_QUEUED, batch_pb.JOB_STATE_RUNNING)
            return None if current.state in running else current

        finished = eventually_blocking(ended, within=120, what="the job ends")
    assert finished.state == batch_pb.JOB_STATE_SUCCEEDED, finished
    return job.name.split("/")[-1]


def test_a_batch_rows_trace_crosses_kafka(mesh: ObservedMesh) -> None:
    """A job submitted through Envoy with x-client-trace-id: its CreateJob span, the worker's shard
    span (the trace context rode the shard's Kafka record) and the shard's inference spans are one
    trace."""
    token = _edge_token(mesh, Scope.BATCH)
    auth = [("authorization", f"Bearer {token}")]

    def shard_trace(spans: list[ReceivedSpan], job_id: str) -> list[ReceivedSpan] | None:
        shards = [
            span
            for span in spans
            if span.name == "batch shard" and span.attributes.get("tensorway.batch.job") == job_id
        ]
        for shard in shards:
            trace = _trace_of(spans, shard.trace_id)
            services = {span.service for span in trace}
            if _with_triton(trace) and {"envoy", "batch"} <= services:
                return trace
        return None

    def attempt() -> tuple[Finder[list[ReceivedSpan]], Callable[[list[ReceivedSpan]], object]]:
        job_id = _traced_job(mesh, auth)
        return lambda spans: shard_trace(spans, job_id), lambda spans: _shard_traces(spans, job_id)

    trace, _ = _retried(mesh, attempt)
    envoy = _only(trace, "envoy", "")
    assert not envoy.parent_span_id
    submit = _only(trace, "batch", "/CreateJob")
    assert submit.parent_span_id == envoy.span_id
    # Every delivery of the shard's message is a child of CreateJob: the batch API publishes a
    # shard again when no worker leased it within seconds (as on a busy machine), with the job's
    # trace context, and the worker then skips the copy it already ran or is running.
    deliveries = [span for span in trace if span.name == "batch shard"]
    assert {(span.service, span.parent_span_id) for span in deliveries} == {("batch-worker", submit.span_id)}
    # The delivery that ran the shard is the one whose descendants infer.
    (ran,) = [
        shard
        for shard in deliveries
        if any(span.service == "router" and _is_descendant(trace, span, shard) for span in trace)
    ]
    _assert_inference_chain([span for span in trace if _is_descendant(trace, span, ran)], ran, "digits")


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


def _wait_for(prometheus: str, expr: str) -> list[dict[str, Any]]:
    """The query's result once it has one (Prometheus scrapes every second, evaluates rules
    every few)."""
    return eventually_blocking(lambda: _query(prometheus, expr), interval=0.5, what=f"a result for {expr}")


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
    _wait_for(prometheus, f"count(up == 1) == {len(jobs)}")
    assert {sample["metric"]["job"] for sample in _query(prometheus, "up == 1")} == jobs
    # The mesh's rules are loaded: a recording rule over the router's series has a value.
    assert _wait_for(prometheus, "tensorway:router_infer_requests:rate5m")
    # Every dashboard query is valid PromQL against the real series.
    for expr in _dashboard_queries():
        _query(prometheus, expr)
