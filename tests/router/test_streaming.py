"""Streams answer in the order their requests came, as Triton's do, while requests still run
concurrently, at most a bounded number per stream; a sequence's requests run one after another
and stay on one endpoint. Compared with Triton itself through Triton's own streaming client."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient

from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.runtime.streams import answer_in_order
from tests.router.conftest import MeshFactory
from tests.router.test_router import simple_request
from tests.router.test_triton_clients import in_thread, triton_inputs


async def numbered(count: int, pulled: list[int] | None = None) -> AsyncIterator[int]:
    for index in range(count):
        if pulled is not None:
            pulled.append(index)
        yield index


async def test_answers_leave_in_request_order_whatever_order_they_finish_in() -> None:
    gates = [asyncio.Event() for _ in range(8)]

    async def answer(index: int) -> int:
        await gates[index].wait()
        return index

    answers: list[int] = []

    async def consume() -> None:
        async for response in answer_in_order(numbered(8), answer, max_in_flight=8):
            answers.append(response)

    consumer = asyncio.ensure_future(consume())
    for gate in reversed(gates):  # the last request finishes first
        gate.set()
        await asyncio.sleep(0)
    await consumer
    assert answers == list(range(8))


async def test_a_stream_has_at_most_max_in_flight_requests_running() -> None:
    running, peak = 0, 0
    release = asyncio.Event()

    async def answer(index: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 4:
            release.set()
        await release.wait()
        running -= 1
        return index

    answers = [response async for response in answer_in_order(numbered(50), answer, max_in_flight=4)]
    assert answers == list(range(50))
    assert peak == 4


async def test_requests_of_one_sequence_run_one_after_another_and_others_alongside() -> None:
    log: list[str] = []
    others_started = asyncio.Event()

    async def answer(index: int) -> int:
        sequence = "even" if index % 2 == 0 else "odd"
        log.append(f"start {sequence} {index}")
        if index == 1:
            others_started.set()
        if index == 0:
            await others_started.wait()  # the other sequence got going meanwhile
        await asyncio.sleep(0)
        log.append(f"end {sequence} {index}")
        return index

    answers = [
        response
        async for response in answer_in_order(
            numbered(10), answer, max_in_flight=10, sequence_of=lambda index: index % 2
        )
    ]
    assert answers == list(range(10))
    for parity in ("even", "odd"):
        steps = [entry for entry in log if entry.split()[1] == parity]
        # Each request of a sequence starts only once the one before it has ended.
        assert [entry.split()[0] for entry in steps] == ["start", "end"] * 5
    assert log.index("start odd 1") < log.index("end even 0")


async def test_an_early_end_of_the_consumer_cancels_what_runs() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def answer(index: int) -> int:
        if index == 0:
            return 0
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return index

    stream = answer_in_order(numbered(3), answer, max_in_flight=3)
    assert await anext(stream) == 0
    await started.wait()
    await stream.aclose()  # type: ignore[attr-defined]
    assert cancelled.is_set()


def good_simple() -> list[grpcclient.InferInput]:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    return triton_inputs({"INPUT0": a, "INPUT1": a})


def wrong_shape() -> list[grpcclient.InferInput]:
    a = np.arange(15, dtype=np.int32).reshape(1, 15)
    return triton_inputs({"INPUT0": a, "INPUT1": a})


def not_decimal() -> list[grpcclient.InferInput]:
    words = np.array([[b"x"] * 16], dtype=np.object_)
    return triton_inputs({"INPUT0": words, "INPUT1": words})


# (model, inputs) in turn: successes with errors of every speed between them: found by the router
# (unknown model), by the orchestrator (shape) and by the model in Triton (not decimal).
MIXED = [
    ("simple", good_simple),
    ("simple", wrong_shape),
    ("simple", good_simple),
    ("no-such-model", good_simple),
    ("simple_string", not_decimal),
    ("simple", good_simple),
    ("digits", lambda: triton_inputs({"input": np.ones((3, 64), dtype=np.float32)})),
]
STREAM_REQUESTS = 1000


def stream_answers(address: str) -> list[str]:
    """Send STREAM_REQUESTS mixed requests on one tritonclient stream; each answer in the order it
    came, as the id it answers or "error"."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with grpcclient.InferenceServerClient(address) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for index in range(STREAM_REQUESTS):
            model, inputs = MIXED[index % len(MIXED)]
            client.async_stream_infer(model, inputs(), request_id=str(index))
        got = [answers.get(timeout=60) for _ in range(STREAM_REQUESTS)]
        client.stop_stream()
    return ["error" if error is not None else result.get_response().id for result, error in got]


async def test_a_streams_answers_come_in_request_order_as_from_triton(
    mesh: MeshFactory, triton_grpc: str
) -> None:
    running = await mesh(real=True)
    direct = await in_thread(lambda: stream_answers(triton_grpc))
    through_router = await in_thread(lambda: stream_answers(running.router.address))
    # MIXED fails at positions 1, 3 and 4.
    expected = [
        "error" if index % len(MIXED) in (1, 3, 4) else str(index) for index in range(STREAM_REQUESTS)
    ]
    assert direct == expected
    assert through_router == direct


async def test_each_sequence_stays_on_one_endpoint_in_order(mesh: MeshFactory) -> None:
    running = await mesh(orchestrators=2)
    sequences, steps = 8, 5

    def send() -> list[tuple[Any, Any]]:
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        with grpcclient.InferenceServerClient(running.router.address) as client:
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            # Interleaved: step 0 of every sequence, then step 1 of every sequence, ...
            for step in range(steps):
                for sequence in range(1, sequences + 1):
                    client.async_stream_infer(
                        "simple",
                        good_simple(),
                        request_id=f"{sequence}:{step}",
                        sequence_id=sequence,
                        sequence_start=step == 0,
                        sequence_end=step == steps - 1,
                    )
            got = [answers.get(timeout=60) for _ in range(sequences * steps)]
            client.stop_stream()
        return got

    got = await in_thread(send)
    assert all(error is None for _, error in got)
    assert [result.get_response().id for result, _ in got] == [
        f"{sequence}:{step}" for step in range(steps) for sequence in range(1, sequences + 1)
    ]
    where: dict[str, set[int]] = {}
    for index, orchestrator in enumerate(running.orchestrators):
        for sequence, _ in orchestrator.arrivals:
            where.setdefault(sequence, set()).add(index)
        for sequence in {sequence for sequence, _ in orchestrator.arrivals}:
            arrived = [request_id for s, request_id in orchestrator.arrivals if s == sequence]
            assert arrived == [f"{sequence}:{step}" for step in range(steps)]
    assert {sequence: len(held) for sequence, held in where.items()} == {
        str(sequence): 1 for sequence in range(1, sequences + 1)
    }
    # Which endpoint a sequence lands on depends on which were available at its START (the
    # order rendezvous gives is fixed, availability is not), so where they land is not asserted.


async def test_tensorway_stream_infer_answers_in_request_order(mesh: MeshFactory) -> None:
    running = await mesh(real=True)
    good = simple_request()
    unknown = simple_request()
    unknown.model_name = "no-such-model"
    misshapen = simple_request()
    misshapen.inputs[0].shape[:] = [1, 15]
    kinds = [good, misshapen, good, unknown, good]

    async def requests() -> AsyncIterator[pb.StreamInferRequest]:
        for index in range(200):
            request = pb.InferRequest()
            request.CopyFrom(kinds[index % len(kinds)])
            request.id = str(index)
            yield pb.StreamInferRequest(request=request)

    async with grpc.aio.insecure_channel(running.router.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        answers = [answer async for answer in stub.StreamInfer(requests())]
    assert [answer.id for answer in answers] == [str(index) for index in range(200)]
    assert [answer.HasField("error") for answer in answers] == [
        index % len(kinds) in (1, 3) for index in range(200)
    ]
