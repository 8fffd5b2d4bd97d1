"""Many requests over few persistent Triton streams: pairing, failures, deadlines, reconnection."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.waiting import eventually

from .conftest import StartOrchestrator, TcpProxy


def simple_request(request_id: str, offset: int, batch: int = 1) -> pb.InferRequest:
    """`simple` with INPUT0 = offset everywhere and INPUT1 = 0..15, so OUTPUT0 tells the offset."""
    first = np.full((batch, 16), offset, dtype=np.int32)
    second = np.tile(np.arange(16, dtype=np.int32), (batch, 1))
    return pb.InferRequest(
        model_name="simple",
        id=request_id,
        inputs=[
            tensor_pb2.Tensor(
                name="INPUT0", datatype="INT32", shape=[batch, 16], raw_contents=first.tobytes()
            ),
            tensor_pb2.Tensor(
                name="INPUT1", datatype="INT32", shape=[batch, 16], raw_contents=second.tobytes()
            ),
        ],
        outputs=[pb.RequestedOutput(name="OUTPUT0", binary=True)],
    )


def held_at(proxy: TcpProxy, offset: int) -> bool:
    """Whether the request `simple_request(..., offset)` made is held at the stalled `proxy`."""
    return np.full(16, offset, dtype=np.int32).tobytes() in proxy.held


def offset_of(response: pb.InferResponse) -> int:
    output = np.frombuffer(response.outputs[0].raw_contents, dtype=np.int32).reshape(
        response.outputs[0].shape
    )
    np.testing.assert_array_equal(output - output[:, :1], np.tile(np.arange(16), (output.shape[0], 1)))
    return int(output[0, 0])


def streams_opened(triton: str) -> float:
    value = REGISTRY.get_sample_value("tensorway_orchestrator_streams_opened_total", {"triton": triton})
    return value or 0.0


async def test_stream_infer_pairs_hundreds_of_concurrent_requests(
    start_orchestrator: StartOrchestrator, triton_proxy: TcpProxy
) -> None:
    address = await start_orchestrator(triton_proxy.address, streams_per_triton=1)
    rng = random.Random(7)
    requests = [simple_request(f"r{i}", offset=i * 3, batch=rng.randint(1, 8)) for i in range(400)]
    # One in fifty does not fit the model: its error comes back on the stream, the rest go on.
    for request in requests[::50]:
        request.inputs[1].shape[1] = 15

    async def send() -> AsyncIterator[pb.StreamInferRequest]:
        for request in requests:
            yield pb.StreamInferRequest(request=request)

    answers: dict[str, pb.StreamInferResponse] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        async for answer in pb_grpc.InferenceServiceStub(channel).StreamInfer(send()):
            answers[answer.id] = answer
    assert set(answers) == {request.id for request in requests}
    for index, request in enumerate(requests):
        answer = answers[request.id]
        if index % 50 == 0:
            assert answer.WhichOneof("result") == "error"
            assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            bad_request = error_details_pb2.BadRequest()
            assert answer.error.details[1].Unpack(bad_request)
            assert bad_request.field_violations[0].field == "inputs[1].shape"
        else:
            assert answer.response.id == request.id
            assert offset_of(answer.response) == index * 3
            assert answer.response.outputs[0].shape == request.inputs[0].shape
    # All of it travelled over one persistent stream on one connection.
    assert streams_opened(triton_proxy.address) == 1
    assert triton_proxy.connections == 1


async def test_unary_infer_shares_the_streams_concurrently(
    start_orchestrator: StartOrchestrator, triton_proxy: TcpProxy
) -> None:
    address = await start_orchestrator(triton_proxy.address, streams_per_triton=2)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        responses = await asyncio.gather(*(stub.Infer(simple_request(f"u{i}", i)) for i in range(300)))
    assert [(r.id, offset_of(r)) for r in responses] == [(f"u{i}", i) for i in range(300)]
    assert streams_opened(triton_proxy.address) == 2


async def test_the_stream_outlives_the_deadline_of_the_request_that_opened_it(
    start_orchestrator: StartOrchestrator, triton_proxy: TcpProxy
) -> None:
    address = await start_orchestrator(triton_proxy.address, streams_per_triton=1)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await stub.Infer(simple_request("first", 1), timeout=0.5)
        await asyncio.sleep(0.8)
        assert offset_of(await stub.Infer(simple_request("later", 2))) == 2
    assert streams_opened(triton_proxy.address) == 1


async def test_a_request_past_its_deadline_fails_and_the_stream_goes_on(
    start_orchestrator: StartOrchestrator, triton_proxy: TcpProxy
) -> None:
    address = await start_orchestrator(
        triton_proxy.address, streams_per_triton=1, default_timeout=timedelta(milliseconds=300)
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await stub.Infer(simple_request("warm", 0))
        triton_proxy.stall()
        with pytest.raises(grpc.aio.AioRpcError) as by_caller:
            await stub.Infer(simple_request("caller-deadline", 1), timeout=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as by_default:
            await stub.Infer(simple_request("default-deadline", 2))
        triton_proxy.resume()
        # Triton's late answers to the abandoned requests are dropped; new requests pair correctly.
        assert offset_of(await stub.Infer(simple_request("after", 3))) == 3
    assert by_caller.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert by_default.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    status = rpc_status.from_call(by_default.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "DEADLINE_EXCEEDED"
    assert streams_opened(triton_proxy.address) == 1


async def test_a_broken_stream_fails_its_requests_as_unavailable_and_is_reopened(
    start_orchestrator: StartOrchestrator, triton_proxy: TcpProxy
) -> None:
    address = await start_orchestrator(triton_proxy.address, streams_per_triton=1)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await stub.Infer(simple_request("before", 0))
        triton_proxy.stall()
        in_flight = asyncio.ensure_future(stub.Infer(simple_request("cut", 1)))
        await eventually(lambda: held_at(triton_proxy, 1), what="the request held at the proxy")
        triton_proxy.sever()
        triton_proxy.resume()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await in_flight
        assert offset_of(await stub.Infer(simple_request("after", 2))) == 2
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert streams_opened(triton_proxy.address) == 2
    assert triton_proxy.connections == 2
