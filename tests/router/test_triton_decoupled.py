"""The decoupled demo model `tokens` through the router, compared with Triton itself: Triton's
streaming client gets every answer of each request (values, order, final flags, the empty final
answer when it asks for one), unary ModelInfer is refused with Triton's code and words, the
tensorway API streams the series on InferStream and StreamInfer, and a client that goes away
mid-series leaves nothing running in the router or the orchestrator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_service

from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tests.demo_models.tokens import MODEL, expected_series, token_series
from tests.router.conftest import Mesh, MeshFactory, specs
from tests.waiting import eventually

PROMPTS = [b"one two three", b"  ", b"\xff\xfe", "pi\u00f1ata fiesta".encode()]


async def tokens_mesh(mesh: MeshFactory, triton_address: str) -> Mesh:
    """A router in front of a real orchestrator, routing `tokens` to it."""
    async with grpc.aio.insecure_channel(triton_address) as channel:
        stub = triton_service.GRPCInferenceServiceStub(channel)
        # The session's Triton is shared: an orchestrator of an earlier test that places only its
        # own deployments may have unloaded the model. Loading a loaded model changes nothing.
        await stub.RepositoryModelLoad(triton.RepositoryModelLoadRequest(model_name=MODEL))
        metadata = await stub.ModelMetadata(triton.ModelMetadataRequest(name=MODEL))

    def routes(endpoints: list[str]) -> list[registry_pb.Route]:
        route = registry_pb.Route(model=MODEL)
        route.versions.add(
            version="1",
            weight=100,
            pool="pools/test",
            endpoints=endpoints,
            platform=metadata.platform,
            inputs=specs(metadata.inputs, 0),
            outputs=specs(metadata.outputs, 0),
        )
        return [route]

    return await mesh(real=True, routes=routes)


def tensorway_request(prompt: bytes, request_id: str = "t1") -> pb.InferRequest:
    request = pb.InferRequest(model_name=MODEL, id=request_id)
    request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(prompt)
    return request


def summary(answer: pb.InferResponse) -> tuple[str, list[bytes] | None, bool]:
    token = list(answer.outputs[0].contents.bytes_contents) if answer.outputs else None
    return answer.id, token, answer.parameters["triton_final_response"].bool_value


@pytest.mark.parametrize("empty_final", [False, True])
async def test_every_answer_of_a_decoupled_model_comes_as_from_triton(
    mesh: MeshFactory, triton_grpc: str, empty_final: bool
) -> None:
    running = await tokens_mesh(mesh, triton_grpc)
    for prompt in PROMPTS:
        direct = await asyncio.to_thread(token_series, triton_grpc, prompt, empty_final=empty_final)
        routed = await asyncio.to_thread(
            token_series, running.router.address, prompt, empty_final=empty_final
        )
        assert routed == direct, prompt
    assert await asyncio.to_thread(
        token_series, running.router.address, b"a b", empty_final=empty_final
    ) == expected_series("r1", ["a", "b"], empty_final=empty_final)


async def test_unary_model_infer_on_a_decoupled_model_is_refused_as_triton_refuses_it(
    mesh: MeshFactory, triton_grpc: str
) -> None:
    running = await tokens_mesh(mesh, triton_grpc)
    request = triton.ModelInferRequest(model_name=MODEL, id="u1")
    request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hi")
    outcomes = []
    for address in (triton_grpc, running.router.address):
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await triton_service.GRPCInferenceServiceStub(channel).ModelInfer(request)
        outcomes.append((refused.value.code(), refused.value.details()))
    assert outcomes[1] == outcomes[0]
    assert outcomes[0][0] == grpc.StatusCode.UNIMPLEMENTED
    # Refused before any orchestrator: nothing reached one, so no breaker counted it.
    assert endpoint_calls(running.endpoints[0]) == 0.0


async def test_infer_stream_and_stream_infer_carry_the_series(mesh: MeshFactory, triton_grpc: str) -> None:
    running = await tokens_mesh(mesh, triton_grpc)
    expected = [("t1", [b"a"], False), ("t1", [b"b"], False), ("t1", None, True)]
    async with grpc.aio.insecure_channel(running.router.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        assert [
            summary(a.response)
            async for a in stub.InferStream(pb.InferStreamRequest(request=tensorway_request(b"a b")))
        ] == expected

        async def items() -> AsyncIterator[pb.StreamInferRequest]:
            yield pb.StreamInferRequest(request=tensorway_request(b"a b", "t1"))
            yield pb.StreamInferRequest(request=tensorway_request(b"c", "t2"))

        answers = [answer async for answer in stub.StreamInfer(items())]
        assert [summary(a.response) for a in answers] == [
            *expected,
            ("t2", [b"c"], False),
            ("t2", None, True),
        ]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Infer(tensorway_request(b"a"))
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_client_that_goes_away_mid_series_leaves_nothing_running(
    mesh: MeshFactory, triton_grpc: str
) -> None:
    running = await tokens_mesh(mesh, triton_grpc)
    prompt = b" ".join(b"w%d" % index for index in range(20000))
    async with grpc.aio.insecure_channel(running.router.address) as channel:
        call = pb_grpc.InferenceServiceStub(channel).InferStream(
            pb.InferStreamRequest(request=tensorway_request(prompt))
        )
        first = await anext(aiter(call))
        assert summary(first.response) == ("t1", [b"w0"], False)
        assert in_flight() == 1.0  # the series is still running at the orchestrator
        call.cancel()
    await eventually(lambda: in_flight() == 0.0, what="the orchestrator's in-flight gauge back at 0")
    await eventually(
        lambda: outstanding(running.endpoints[0]) == 0.0, what="the router's outstanding calls back at 0"
    )


def in_flight() -> float | None:
    return REGISTRY.get_sample_value("tensorway_orchestrator_in_flight", {"model": MODEL})


def outstanding(endpoint: str) -> float | None:
    return REGISTRY.get_sample_value("tensorway_router_endpoint_outstanding", {"endpoint": endpoint})


def endpoint_calls(endpoint: str) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if (
                sample.name == "tensorway_router_endpoint_calls_total"
                and sample.labels.get("endpoint") == endpoint
            ):
                total += sample.value
    return total
