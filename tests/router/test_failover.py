"""Two orchestrators, each with its own Triton: one is killed under steady load and comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import grpc
from prometheus_client import REGISTRY

from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.router.conftest import (
    FakeRegistry,
    OrchestratorProcess,
    RouteFactory,
    start_registry,
    start_router,
)
from tests.router.test_router import assert_simple_answer, simple_request
from tests.waiting import eventually

WORKERS = 16
OUTAGE_SECONDS = 6


def ok_calls(endpoint: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "tensorway_router_endpoint_calls_total", {"endpoint": endpoint, "grpc_code": "OK"}
        )
        or 0.0
    )


def breaker_open(endpoint: str) -> float | None:
    return REGISTRY.get_sample_value("tensorway_router_breaker_open", {"endpoint": endpoint})


async def test_killing_one_orchestrator_under_load_fails_almost_nothing_and_it_comes_back(
    triton_grpc: str,
    second_triton: str,
    make_route: RouteFactory,
    orchestrator_processes: Callable[[str, Iterable[str]], OrchestratorProcess],
) -> None:
    victim = orchestrator_processes(triton_grpc, ["simple"])
    survivor = orchestrator_processes(second_triton, ["simple"])
    await asyncio.gather(victim.start(), survivor.start())
    registry = FakeRegistry()
    registry.publish([make_route("simple", [victim.address, survivor.address])])
    registry_running = await start_registry(registry)
    router = await start_router(registry_running.address)
    outcomes: list[tuple[float, grpc.StatusCode]] = []
    stop = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)

            async def worker() -> None:
                while not stop.is_set():
                    try:
                        assert_simple_answer(await stub.Infer(simple_request(), timeout=5))
                        outcomes.append((time.monotonic(), grpc.StatusCode.OK))
                    except grpc.aio.AioRpcError as error:
                        outcomes.append((time.monotonic(), error.code()))

            workers = [asyncio.create_task(worker()) for _ in range(WORKERS)]
            await eventually(lambda: ok_calls(victim.address) > 100, what="the victim answering")

            await victim.kill()
            await eventually(lambda: breaker_open(victim.address) == 1, what="the victim's breaker open")
            # The outage itself: long enough for gRPC's reconnect backoff to grow.
            await asyncio.sleep(OUTAGE_SECONDS)
            assert breaker_open(victim.address) == 1
            during_outage = ok_calls(survivor.address)

            await victim.start()
            back_at = time.monotonic()
            before = ok_calls(victim.address)
            await eventually(
                lambda: ok_calls(victim.address) > before + 100, what="traffic back on the victim"
            )
            returned_after = time.monotonic() - back_at
            settled = len(outcomes)
            await eventually(lambda: len(outcomes) > settled + 100, what="more answers after the return")
            stop.set()
            await asyncio.gather(*workers)
    finally:
        await router.server.stop()
        await registry_running.server.stop()

    failures = [outcome for outcome in outcomes if outcome[1] != grpc.StatusCode.OK]
    print(
        f"\n{len(outcomes)} requests, {len(failures)} failed; the survivor answered "
        f"{during_outage:.0f} by the end of the outage; traffic returned {returned_after} s after restart"
    )
    assert len(outcomes) > 1000
    assert len(failures) <= 0.001 * len(outcomes), failures[:10]
    # How soon traffic returns is a performance figure: the chaos suite measures recovery.
    assert breaker_open(victim.address) == 0
