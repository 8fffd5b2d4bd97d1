"""The fan-out of a stream's requests, shared by the router and the orchestrator: the requests of
one stream run concurrently but are answered in the order they came (as Triton answers a
ModelStreamInfer stream), a stream has a bounded number of requests in flight, and the requests
of one stateful sequence run one after another.

A request may have several answers (a decoupled model's series): they leave together, in the
order they were made, after every answer of the requests before it and before any of the
requests after it, which meanwhile run and keep theirs.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Hashable
from contextlib import aclosing
from typing import Generic, TypeVar

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


class _EndOfSeries:
    """Queued after the last answer of a request, and after the last request of a stream."""


_END = _EndOfSeries()


class _Series(Generic[ResponseT]):
    """The answers of one request, as they are made, and the task making them."""

    __slots__ = ("answers", "task")

    def __init__(self) -> None:
        self.answers: asyncio.Queue[ResponseT | _EndOfSeries] = asyncio.Queue()
        self.task: asyncio.Future[None] | None = None


async def answer_in_order(
    requests: AsyncIterator[RequestT],
    answer: Callable[[RequestT], Awaitable[ResponseT]],
    max_in_flight: int,
    sequence_of: Callable[[RequestT], Hashable | None] = lambda _: None,
) -> AsyncIterator[ResponseT]:
    """Yield `answer(request)` for every request, in the order the requests came; see
    `answer_series_in_order`, of which this is the one-answer case."""

    async def one(request: RequestT) -> AsyncIterator[ResponseT]:
        yield await answer(request)

    # Closed as soon as this generator is, so its tasks end with it, not whenever it is collected.
    async with aclosing(answer_series_in_order(requests, one, max_in_flight, sequence_of)) as responses:
        async for response in responses:
            yield response


async def answer_series_in_order(
    requests: AsyncIterator[RequestT],
    answers: Callable[[RequestT], AsyncIterator[ResponseT]],
    max_in_flight: int,
    sequence_of: Callable[[RequestT], Hashable | None] = lambda _: None,
) -> AsyncGenerator[ResponseT, None]:
    """Yield every answer of `answers(request)` for every request, request after request in the
    order they came.

    Requests still run concurrently: at most `max_in_flight` of one stream at a time, each counted
    until its last answer is sent. Past that the stream is not read any further, so gRPC's flow
    control holds the client back instead of the server's memory. Requests whose `sequence_of` is
    the same key (a stateful sequence) run one after another, each once the one before it has
    made its last answer, so they reach the backend in order.

    `answers` turns failures into answers itself; an exception out of it or out of `requests`
    (the caller went away) ends the stream. However the stream ends (the consumer stops early,
    or is cancelled), every task it started is cancelled and awaited before it returns.
    """
    if max_in_flight < 1:
        raise ValueError("a stream needs at least one request in flight")
    fan_out = _FanOut(answers, max_in_flight, sequence_of)
    reader = asyncio.ensure_future(fan_out.read(requests))
    try:
        while not isinstance(series := await fan_out.queued.get(), _EndOfSeries):
            while not isinstance(response := await series.answers.get(), _EndOfSeries):
                yield response
            assert series.task is not None
            await series.task  # re-raises what ended its answers early
            fan_out.slots.release()
        reader.result()  # re-raises what ended the reading early
    finally:
        reader.cancel()
        for task in fan_out.running:
            task.cancel()
        await asyncio.gather(reader, *fan_out.running, return_exceptions=True)


class _FanOut(Generic[RequestT, ResponseT]):
    """The reading side of `answer_series_in_order`: a task per request, queued in request order."""

    def __init__(
        self,
        answers: Callable[[RequestT], AsyncIterator[ResponseT]],
        max_in_flight: int,
        sequence_of: Callable[[RequestT], Hashable | None],
    ) -> None:
        self._answers = answers
        self._sequence_of = sequence_of
        self.slots = asyncio.Semaphore(max_in_flight)
        # Each request's series in request order; the end marker once the requests are all read.
        self.queued: asyncio.Queue[_Series[ResponseT] | _EndOfSeries] = asyncio.Queue()
        self.running: set[asyncio.Future[None]] = set()
        self._last_of_sequence: dict[Hashable, asyncio.Future[None]] = {}

    async def read(self, requests: AsyncIterator[RequestT]) -> None:
        try:
            iterator = aiter(requests)
            while True:
                await self.slots.acquire()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    return
                self._start(request)
        finally:
            self.queued.put_nowait(_END)

    def _start(self, request: RequestT) -> None:
        key = self._sequence_of(request)
        previous = None if key is None else self._last_of_sequence.get(key)
        series: _Series[ResponseT] = _Series()
        # A task per request, started now so that requests leave in the order they came;
        # `running` holds it until it ends, and the stream's end cancels and awaits what is left.
        series.task = task = asyncio.ensure_future(self._run(previous, request, series))
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        if key is not None:
            self._last_of_sequence[key] = task
            task.add_done_callback(functools.partial(self._forget, key))
        self.queued.put_nowait(series)

    async def _run(
        self, previous: asyncio.Future[None] | None, request: RequestT, series: _Series[ResponseT]
    ) -> None:
        if previous is not None:
            # Its outcome is its own answers' business; only the order matters here.
            await asyncio.wait((previous,))
        try:
            async for response in self._answers(request):
                series.answers.put_nowait(response)
        finally:
            series.answers.put_nowait(_END)

    def _forget(self, key: Hashable, task: asyncio.Future[None]) -> None:
        if self._last_of_sequence.get(key) is task:
            del self._last_of_sequence[key]
