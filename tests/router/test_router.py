"""The router between a registry fake and orchestrator fakes in front of the real Triton, through
tensorway's InferenceService: routing, splits, stickiness, errors, deadlines, shedding, retries,
registry outages and shadow traffic."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.router.conftest import (
    FakeOrchestrator,
    Mesh,
    MeshFactory,
    RouteFactory,
    start_orchestrator,
    start_registry,
)
from tests.waiting import eventually

ROUTE_KEY = "x-tensorway-route-key"
# ServiceServer.stop treats a zero grace as "use the default" (5 s), so "none" is one millisecond.
NO_GRACE = timedelta(milliseconds=1)


def simple_request(request_id: str = "", version: str = "") -> pb.InferRequest:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    return pb.InferRequest(
        model_name="simple",
        model_version=version,
        id=request_id,
        inputs=[
            tensor_pb2.Tensor(name="INPUT0", datatype="INT32", shape=[1, 16], raw_contents=a.tobytes()),
            tensor_pb2.Tensor(name="INPUT1", datatype="INT32", shape=[1, 16], raw_contents=b.tobytes()),
        ],
        outputs=[pb.RequestedOutput(name="OUTPUT0", binary=True)],
    )


def assert_simple_answer(response: pb.InferResponse) -> None:
    (output,) = response.outputs
    assert output.name == "OUTPUT0"
    total = np.frombuffer(output.raw_contents, dtype=np.int32)
    np.testing.assert_array_equal(total, np.arange(16) + 3)


def error_detail(error: grpc.aio.AioRpcError, kind: Any) -> Any:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            found = kind()
            detail.Unpack(found)
            return found
    raise AssertionError(f"no {kind.DESCRIPTOR.name} in the status")


@pytest.fixture
async def connect() -> AsyncIterator[Any]:
    channels: list[grpc.aio.Channel] = []

    def stub(mesh: Mesh) -> pb_grpc.InferenceServiceStub:
        channels.append(grpc.aio.insecure_channel(mesh.router.address))
        return pb_grpc.InferenceServiceStub(channels[-1])

    yield stub
    for channel in channels:
        await channel.close()


async def answered_version(stub: pb_grpc.InferenceServiceStub, version: str) -> bool:
    return (await stub.Infer(simple_request())).model_version == version


async def knows_version(stub: pb_grpc.InferenceServiceStub, version: str) -> bool:
    """Whether the router's table has `version` of `simple` (asked without running it)."""
    try:
        await stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name="simple", model_version=version))
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return False
    return True


async def send_many(
    stub: pb_grpc.InferenceServiceStub, count: int, concurrency: int = 64, **kwargs: Any
) -> list[Any]:
    """`count` requests for `simple`, `concurrency` at a time; returns responses or errors."""
    results: list[Any] = []
    semaphore = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with semaphore:
            try:
                results.append(await stub.Infer(simple_request(str(index)), **kwargs))
            except grpc.aio.AioRpcError as error:
                results.append(error)

    await asyncio.gather(*(one(index) for index in range(count)))
    return results


async def test_infer_raw_and_typed_and_metadata(mesh: MeshFactory, connect: Any) -> None:
    stub = connect(await mesh())
    response = await stub.Infer(simple_request("req-7"))
    assert (response.model_name, response.model_version, response.id) == ("simple", "1", "req-7")
    assert_simple_answer(response)

    typed = pb.InferRequest(
        model_name="iris",
        inputs=[
            tensor_pb2.Tensor(
                name="input",
                datatype="FP32",
                shape=[1, 4],
                contents=tensor_pb2.TensorContents(fp32_contents=[5.1, 3.5, 1.4, 0.2]),
            )
        ],
    )
    answer = await stub.Infer(typed)
    outputs = {tensor.name: tensor for tensor in answer.outputs}
    assert list(outputs["label"].contents.int64_contents) == [0]  # a textbook setosa
    assert len(outputs["probabilities"].contents.fp32_contents) == 3

    metadata = await stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name="digits"))
    assert (metadata.name, list(metadata.versions), metadata.max_batch_size) == ("digits", ["1"], 1024)
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [64])]


async def test_stream_infer_answers_each_request_and_survives_errors(mesh: MeshFactory, connect: Any) -> None:
    stub = connect(await mesh())

    async def requests() -> AsyncIterator[pb.StreamInferRequest]:
        for index in range(20):
            yield pb.StreamInferRequest(request=simple_request(f"ok-{index}"))
        yield pb.StreamInferRequest(request=pb.InferRequest(model_name="nope", id="bad"))
        yield pb.StreamInferRequest(request=simple_request("last"))

    answers = {answer.id: answer async for answer in stub.StreamInfer(requests())}
    assert len(answers) == 22
    assert answers["bad"].WhichOneof("result") == "error"
    assert answers["bad"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    info = error_details_pb2.ErrorInfo()
    assert answers["bad"].error.details[0].Unpack(info)
    assert info.reason == "MODEL_NOT_FOUND"
    for request_id in ["last", *(f"ok-{index}" for index in range(20))]:
        assert_simple_answer(answers[request_id].response)


async def test_unknown_model_and_version_are_not_found(mesh: MeshFactory, connect: Any) -> None:
    stub = connect(await mesh())
    for request in (pb.InferRequest(model_name="nope"), simple_request(version="9")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Infer(request)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_detail(raised.value, error_details_pb2.ErrorInfo).reason == "MODEL_NOT_FOUND"


async def test_a_90_10_split_and_sticky_keys_through_the_router(
    mesh: MeshFactory, connect: Any, make_route: RouteFactory
) -> None:
    running = await mesh(routes=lambda endpoints: [make_route("simple", endpoints, {"1": 90, "2": 10})])
    stub = connect(running)
    results = await send_many(stub, 5000)
    versions = Counter(result.model_version for result in results)
    assert sum(versions.values()) == 5000
    assert abs(versions["2"] / 5000 - 0.10) <= 0.03

    pinned: dict[str, set[str]] = {}
    for index in range(100):
        key = f"customer-{index}"
        for _ in range(5):
            answer = await stub.Infer(simple_request(), metadata=((ROUTE_KEY, key),))
            pinned.setdefault(key, set()).add(answer.model_version)
    assert all(len(versions) == 1 for versions in pinned.values())
    assert {version for versions in pinned.values() for version in versions} == {"1", "2"}


async def test_aliases_and_explicit_versions(
    mesh: MeshFactory, connect: Any, make_route: RouteFactory
) -> None:
    running = await mesh(
        routes=lambda endpoints: [
            make_route("simple", endpoints, {"1": 100, "2": 0}, aliases={"canary": "2"})
        ]
    )
    stub = connect(running)
    assert (await stub.Infer(simple_request(version="canary"))).model_version == "2"
    assert (await stub.Infer(simple_request(version="2"))).model_version == "2"
    assert {(await stub.Infer(simple_request())).model_version for _ in range(20)} == {"1"}


async def test_route_changes_apply_live(mesh: MeshFactory, connect: Any, make_route: RouteFactory) -> None:
    running = await mesh()
    stub = connect(running)
    running.registry.publish([make_route("simple", running.endpoints, {"3": 100})], removed=["iris"])
    await eventually(lambda: answered_version(stub, "3"), what="version 3 answers")
    assert (await stub.Infer(simple_request())).model_version == "3"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name="iris"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_registry_down_keeps_the_last_routes_and_reconnects(
    mesh: MeshFactory, connect: Any, make_route: RouteFactory
) -> None:
    running = await mesh(watch_backoff_max="PT0.2S")
    stub = connect(running)
    await running.registry_running.server.stop(NO_GRACE)
    results = await send_many(stub, 200)
    assert all(isinstance(result, pb.InferResponse) for result in results)

    # The registry comes back (same address) with new routes: the router resubscribes.
    running.registry.routes.clear()
    running.registry.publish([make_route("simple", running.endpoints, {"5": 100})])
    back = await start_registry(running.registry, port=running.registry_running.port)
    try:
        await eventually(lambda: answered_version(stub, "5"), what="version 5 answers")
        assert (await stub.Infer(simple_request())).model_version == "5"
    finally:
        await back.server.stop(NO_GRACE)


async def test_deadlines_are_passed_downstream_and_reported(mesh: MeshFactory, connect: Any) -> None:
    running = await mesh()
    stub = connect(running)
    running.orchestrators[0].delay = 2.0
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Infer(simple_request(), timeout=0.3)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    seen = running.orchestrators[0].deadlines[-1]
    assert seen is not None
    assert 0 < seen <= 0.35


async def test_load_past_the_limit_is_shed_with_retry_info(mesh: MeshFactory, connect: Any) -> None:
    running = await mesh(max_concurrency=4, shed_retry_after="PT0.25S")
    stub = connect(running)
    running.orchestrators[0].delay = 0.3
    results = await send_many(stub, 12, concurrency=12)
    shed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(shed) == 8
    assert all(error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for error in shed)
    retry_info = error_detail(shed[0], error_details_pb2.RetryInfo)
    assert retry_info.retry_delay.ToTimedelta().total_seconds() == 0.25


async def test_unavailable_and_shed_endpoints_are_retried_elsewhere_and_breakers_open(
    mesh: MeshFactory, connect: Any
) -> None:
    running = await mesh(orchestrators=2)
    stub = connect(running)
    broken, healthy = running.orchestrators
    broken.fail_with = grpc.StatusCode.UNAVAILABLE
    answered = {"model": "simple", "version": "1", "grpc_code": "OK"}
    before = REGISTRY.get_sample_value("tensorway_router_request_seconds_count", answered) or 0
    results = await send_many(stub, 200, concurrency=4)
    assert all(isinstance(result, pb.InferResponse) for result in results)
    ejected = {"endpoint": running.endpoints[0]}
    assert REGISTRY.get_sample_value("tensorway_router_breaker_open", ejected) == 1
    assert REGISTRY.get_sample_value("tensorway_router_breaker_trips_total", ejected)
    # Each answer timed once, retries included.
    assert REGISTRY.get_sample_value("tensorway_router_request_seconds_count", answered) == before + 200
    assert broken.calls <= 10  # the breaker stopped sending it traffic
    assert healthy.calls >= 200

    broken.fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    broken.calls = 0
    trips = REGISTRY.get_sample_value("tensorway_router_breaker_trips_total", ejected)

    async def probed_again_and_again() -> bool:
        results = await send_many(stub, 20, concurrency=4)
        assert all(isinstance(result, pb.InferResponse) for result in results)
        return broken.calls >= 3

    # Once the breaker half-opens its probes reach the endpoint. RESOURCE_EXHAUSTED says nothing of
    # its health: the breaker does not open again, so probing goes on.
    await eventually(probed_again_and_again, what="probes of the half-open endpoint")
    assert REGISTRY.get_sample_value("tensorway_router_breaker_trips_total", ejected) == trips


async def test_a_pool_with_every_endpoint_down_is_unavailable_with_retry_info(
    mesh: MeshFactory, connect: Any, triton_grpc: str
) -> None:
    running = await mesh(orchestrators=2, breaker_open_for="PT2S")
    stub = connect(running)
    assert_simple_answer(await stub.Infer(simple_request()))
    ports = [orchestrator.port for orchestrator in running.orchestrators_running]
    for orchestrator in running.orchestrators_running:
        await orchestrator.server.stop(NO_GRACE)

    async def refused_by_the_router() -> grpc.aio.AioRpcError | None:
        # Each failure counts against its endpoint's breaker; once all of them are open the
        # router answers itself, saying when the pool will next be tried.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Infer(simple_request(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value
        status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
        told_when = status is not None and any(
            detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for detail in status.details
        )
        return raised.value if told_when else None

    refused = await eventually(refused_by_the_router, what="UNAVAILABLE with RetryInfo")
    delay = error_detail(refused, error_details_pb2.RetryInfo).retry_delay.ToTimedelta()
    assert timedelta(0) <= delay <= timedelta(seconds=2)
    info = error_detail(refused, error_details_pb2.ErrorInfo)
    assert info.reason == "MODEL_NOT_READY"
    assert "no healthy endpoint" in (refused.details() or "")

    # The pool comes back where it was: the breakers' probes find it.
    back = [
        await start_orchestrator(FakeOrchestrator(triton_grpc, name=f"back-{port}"), port=port)
        for port in ports
    ]
    try:

        async def answered() -> bool:
            try:
                assert_simple_answer(await stub.Infer(simple_request(), timeout=10))
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return False
            return True

        await eventually(answered, what="an answer from the restarted pool")
    finally:
        for orchestrator in back:
            await orchestrator.server.stop(NO_GRACE)


async def test_client_errors_are_not_retried(mesh: MeshFactory, connect: Any) -> None:
    running = await mesh(orchestrators=2)
    stub = connect(running)
    for orchestrator in running.orchestrators:
        orchestrator.fail_with = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Infer(simple_request())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sum(orchestrator.calls for orchestrator in running.orchestrators) == 1


def shadow_counts(version: str) -> Counter[str]:
    return Counter(
        {
            outcome: REGISTRY.get_sample_value(
                "tensorway_router_shadow_total", {"model": "simple", "version": version, "outcome": outcome}
            )
            or 0
            for outcome in ("match", "mismatch", "error", "dropped")
        }
    )


async def shadow_on_second_orchestrator(running: Mesh, connect: Any, version: str) -> Any:
    """Add `version` of `simple`, with no traffic of its own and served by the second orchestrator
    only, to the route; a stub once the router has it."""
    route = running.registry.routes["simple"]
    shadow_version = route.versions.add()
    shadow_version.CopyFrom(route.versions[0])
    shadow_version.version, shadow_version.weight = version, 0
    del shadow_version.endpoints[:]
    shadow_version.endpoints.append(running.endpoints[1])
    running.registry.publish([route])
    stub = connect(running)
    await eventually(lambda: knows_version(stub, version), what=f"the route with version {version}")
    return stub


async def test_shadow_traffic_is_compared_counted_and_never_returned(
    mesh: MeshFactory, connect: Any, make_route: RouteFactory
) -> None:
    running = await mesh(
        routes=lambda endpoints: [make_route("simple", endpoints, {"1": 100, "7": 0}, shadow=("7", 100))]
    )
    stub = connect(running)
    before = shadow_counts("7")
    results = await send_many(stub, 50, concurrency=8)
    assert {result.model_version for result in results} == {"1"}
    await eventually(lambda: sum((shadow_counts("7") - before).values()) >= 50, what="50 shadows settled")
    assert (shadow_counts("7") - before) == Counter({"match": 50})
    assert Counter(running.orchestrators[0].versions) == Counter({"1": 50, "7": 50})


async def test_a_shadow_that_answers_differently_is_counted_and_sampled_within_a_bound(
    mesh: MeshFactory, connect: Any, make_route: RouteFactory, caplog: pytest.LogCaptureFixture
) -> None:
    running = await mesh(
        orchestrators=2,
        shadow_mismatch_samples=3,
        routes=lambda endpoints: [make_route("simple", endpoints[:1], {"1": 100}, shadow=("9", 100))],
    )
    # Version 9 runs on the second orchestrator, whose Triton sees INPUT1 one larger: every
    # OUTPUT0 (INPUT0 + INPUT1) it computes is one more than the primary's.
    running.orchestrators[1].drift = 1
    stub = await shadow_on_second_orchestrator(running, connect, "9")
    before = shadow_counts("9")
    caplog.set_level(logging.WARNING, logger="tensorway.router.shadow")
    results = await send_many(stub, 20, concurrency=4)
    for result in results:
        assert result.model_version == "1"
        assert_simple_answer(result)  # the primary's answer, never the shadow's
    await eventually(lambda: sum((shadow_counts("9") - before).values()) >= 20, what="20 shadows settled")
    assert (shadow_counts("9") - before) == Counter({"mismatch": 20})
    samples = [record for record in caplog.records if record.name == "tensorway.router.shadow"]
    assert len(samples) == 3  # the bound, whatever the number of mismatches
    for sample in samples:
        assert (sample.model, sample.version, sample.shadow_version) == ("simple", "1", "9")  # type: ignore[attr-defined]
        assert sample.request_id in {str(index) for index in range(20)}  # type: ignore[attr-defined]
        (difference,) = sample.differences.items()  # type: ignore[attr-defined]
        assert difference[0] == "OUTPUT0"
        assert difference[1]["primary"].startswith("INT32[1, 16] [3, 4, 5")
        assert difference[1]["shadow"].startswith("INT32[1, 16] [4, 5, 6")


async def test_a_slow_or_failing_shadow_never_slows_or_fails_the_primary(
    mesh: MeshFactory, connect: Any, make_route: RouteFactory
) -> None:
    running = await mesh(
        orchestrators=2,
        routes=lambda endpoints: [
            make_route("simple", endpoints[:1], {"1": 100}, shadow=("8", 100)),
        ],
    )
    # Version 8 lives on the second orchestrator only, which holds every call and then fails.
    shadow = running.orchestrators[1]
    shadow.gate = asyncio.Event()
    stub = await shadow_on_second_orchestrator(running, connect, "8")
    before = shadow_counts("8")
    results = await send_many(stub, 20, concurrency=4)
    assert all(isinstance(result, pb.InferResponse) for result in results)
    # Every primary answered while its shadow is still held.
    assert shadow.calls == 20
    assert shadow_counts("8") == before
    shadow.fail_with = grpc.StatusCode.INTERNAL
    shadow.gate.set()
    results = await send_many(stub, 20, concurrency=4)
    assert all(isinstance(result, pb.InferResponse) and result.model_version == "1" for result in results)
    await eventually(lambda: (shadow_counts("8") - before)["error"] >= 40, what="40 failed shadows")
