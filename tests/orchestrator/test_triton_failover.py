"""A pool of two Tritons (two proxies to the session's real Triton): a request whose Triton breaks,
is down or stalls is answered by the other one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc

from .conftest import StartOrchestrator, TcpProxy
from .test_streams import offset_of, simple_request


@pytest.fixture
async def second_proxy(triton_grpc: str) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(triton_grpc)
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_a_request_whose_stream_breaks_runs_on_the_other_triton(
    start_orchestrator: StartOrchestrator, triton_proxy: TcpProxy, second_proxy: TcpProxy
) -> None:
    address = await start_orchestrator(triton_proxy.address, second_proxy.address, streams_per_triton=1)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await stub.Infer(simple_request("warm", 0))
        triton_proxy.stall()
        # Both Tritons are idle, so the first one takes it, and holds it.
        in_flight = asyncio.ensure_future(stub.Infer(simple_request("cut", 1)))
        await asyncio.sleep(0.2)
        triton_proxy.sever()
        triton_proxy.refuse()
        triton_proxy.resume()
        assert offset_of(await in_flight) == 1
        answers = await asyncio.gather(*(stub.Infer(simple_request(f"after-{i}", i)) for i in range(20)))
    assert [offset_of(answer) for answer in answers] == list(range(20))


async def test_a_stalled_triton_is_hedged_to_the_other(
    start_orchestrator: StartOrchestrator, triton_proxy: TcpProxy, second_proxy: TcpProxy
) -> None:
    address = await start_orchestrator(
        triton_proxy.address, second_proxy.address, streams_per_triton=1, hedge_after="PT0.1S"
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await stub.Infer(simple_request("warm", 0))
        triton_proxy.stall()
        started = time.monotonic()
        answer = await stub.Infer(simple_request("stalled", 7), timeout=5)
        waited = time.monotonic() - started
        triton_proxy.resume()
    assert offset_of(answer) == 7
    assert waited < 2
