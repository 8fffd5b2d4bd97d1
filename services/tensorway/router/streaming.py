"""What both public APIs share: the caller's route key; and for streams, that the requests of one
stream run concurrently but are answered in the order they came, a stream has a bounded number of
requests in flight, a sequence's requests run in order, and a failed request becomes an error on
the stream instead of ending it."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any, TypeVar

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from tensorway.runtime import errors

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


class _EndOfStream:
    """Queued after the last answer of a stream."""


def route_key(context: grpc.aio.ServicerContext[Any, Any], header: str) -> str | None:
    """The caller's route key (the value of `header`), if it sent one."""
    for key, value in context.invocation_metadata() or ():
        if key == header and isinstance(value, str):
            return value
    return None


def status_of(error: BaseException) -> Any:
    """The google.rpc.Status a unary call would have failed with, for an error sent on a stream."""
    if isinstance(error, errors.TensorwayError):
        return error.to_status_proto()
    if isinstance(error, grpc.aio.AioRpcError):
        # A downstream tensorway service's status, with its details, passes through as it is.
        downstream = rpc_status.from_call(error)
        if downstream is not None:
            return downstream
        return status_pb2.Status(code=error.code().value[0], message=error.details() or "")
    logger.error("unhandled error in a stream", exc_info=error)
    return errors.Internal(errors.GENERIC_INTERNAL_MESSAGE).to_status_proto()


async def answer_in_order(
    requests: AsyncIterator[RequestT],
    answer: Callable[[RequestT], Awaitable[ResponseT]],
    max_in_flight: int,
    sequence_of: Callable[[RequestT], Hashable | None] = lambda _: None,
) -> AsyncIterator[ResponseT]:
    """Yield `answer(request)` for every request, in the order the requests came, as Triton does.

    Requests still run concurrently, and leave in the order they came: at most `max_in_flight` of
    one stream at a time, each counted until its answer is sent. Past that the stream is not read
    any further, so gRPC's flow control holds the client back instead of the router's memory.
    Requests whose `sequence_of` is the same key (a stateful sequence) run one after another, each
    once the one before it has been answered, so they reach the backend in order.

    `answer` turns failures into responses itself; an exception out of it or out of `requests`
    (the caller went away) ends the stream and cancels what is still running.
    """
    if max_in_flight < 1:
        raise ValueError("a stream needs at least one request in flight")
    slots = asyncio.Semaphore(max_in_flight)
    # Answers in request order; the end marker once the requests are all read.
    queued: asyncio.Queue[asyncio.Future[ResponseT] | _EndOfStream] = asyncio.Queue()
    running: set[asyncio.Future[ResponseT]] = set()
    last_of_sequence: dict[Hashable, asyncio.Future[ResponseT]] = {}

    async def after(previous: asyncio.Future[ResponseT] | None, request: RequestT) -> ResponseT:
        if previous is not None:
            # Its outcome is its own answer's business; only the order matters here.
            await asyncio.wait((previous,))
        return await answer(request)

    def forget(key: Hashable, task: asyncio.Future[ResponseT]) -> None:
        if last_of_sequence.get(key) is task:
            del last_of_sequence[key]

    async def read() -> None:
        try:
            iterator = aiter(requests)
            while True:
                await slots.acquire()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    return
                key = sequence_of(request)
                previous = None if key is None else last_of_sequence.get(key)
                # A task per request, started now so that requests leave in the order they came;
                # `running` and the queue hold it, and the `finally` below cancels what is left.
                task = asyncio.ensure_future(after(previous, request))
                running.add(task)
                task.add_done_callback(running.discard)
                if key is not None:
                    last_of_sequence[key] = task
                    task.add_done_callback(functools.partial(forget, key))
                queued.put_nowait(task)
        finally:
            queued.put_nowait(_EndOfStream())

    reader = asyncio.ensure_future(read())
    try:
        while not isinstance(next_answer := await queued.get(), _EndOfStream):
            response = await next_answer
            slots.release()
            yield response
        reader.result()  # re-raises what ended the reading early
    finally:
        reader.cancel()
        for task in running:
            task.cancel()
        await asyncio.gather(reader, *running, return_exceptions=True)
