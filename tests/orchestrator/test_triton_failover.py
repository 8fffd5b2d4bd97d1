"""A pool of two Tritons (two proxies to the session's real Triton): a request whose Triton breaks,
is down or stalls is answered by the other one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest

from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.waiting import PATIENCE, eventually

from .conftest import StartOrchestrator, TcpProxy
from .test_models import SERVING, health_becomes
from .test_streams import held_at, offset_of, simple_request

# Readiness is polled once, at start-up, and the test waits for that poll: a poll held by the
# stalled proxy would time out and take the first Triton out of the choice before any request
# reaches it.
NO_LATER_POLLS = timedelta(hours=1)


@pytest.fixture
async def second_proxy(triton_grpc: str) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(triton_grpc)
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_a_request_whose_stream_breaks_runs_on_the_other_triton(
    start_orchestrator: StartOrchestrator, triton_proxy: TcpProxy, second_proxy: TcpProxy
) -> None:
    address = await start_orchestrator(
        triton_proxy.address, second_proxy.address, streams_per_triton=1, health_interval=NO_LATER_POLLS
    )
    await health_becomes(address, "models/simple", SERVING)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await stub.Infer(simple_request("warm", 0))
        triton_proxy.stall()
        # Requests until the orchestrator sends one to the first Triton, which holds it.
        for offset in range(1, 20):
            in_flight = asyncio.ensure_future(stub.Infer(simple_request(f"cut-{offset}", offset)))
            await eventually(
                lambda: held_at(triton_proxy, offset) or in_flight.done(),  # noqa: B023
                what="the request held at the first Triton or answered by the second",
            )
            if held_at(triton_proxy, offset):
                break
            assert offset_of(await in_flight) == offset
        else:
            raise AssertionError("no request went to the first Triton")
        triton_proxy.sever()
        triton_proxy.refuse()
        triton_proxy.resume()
        assert offset_of(await in_flight) == offset
        answers = await asyncio.gather(*(stub.Infer(simple_request(f"after-{i}", i)) for i in range(20)))
    assert [offset_of(answer) for answer in answers] == list(range(20))


async def test_a_stalled_triton_is_hedged_to_the_other(
    start_orchestrator: StartOrchestrator, triton_proxy: TcpProxy, second_proxy: TcpProxy
) -> None:
    address = await start_orchestrator(
        triton_proxy.address,
        second_proxy.address,
        streams_per_triton=1,
        hedge_after="PT0.1S",
        health_interval=NO_LATER_POLLS,
    )
    await health_becomes(address, "models/simple", SERVING)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await stub.Infer(simple_request("warm", 0))
        triton_proxy.stall()
        # The orchestrator picks either Triton: requests until one goes to the stalled Triton,
        # which never answers while the proxy holds it, so only a hedge can answer that one.
        for offset in range(1, 20):
            answer = await stub.Infer(simple_request(f"stalled-{offset}", offset), timeout=PATIENCE)
            assert offset_of(answer) == offset
            if held_at(triton_proxy, offset):
                break
        else:
            raise AssertionError("no request went to the stalled Triton")
        triton_proxy.resume()
