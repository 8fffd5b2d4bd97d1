"""What both public APIs share: the caller's route key; and for streams, that the requests of one
stream run concurrently, answers go back as they finish, and a failed request becomes an error on
the stream instead of ending it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
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


async def answer_concurrently(
    requests: AsyncIterator[RequestT], answer: Callable[[RequestT], Awaitable[ResponseT]]
) -> AsyncIterator[ResponseT]:
    """Yield `answer(request)` for every request, in the order they finish.

    `answer` turns failures into responses itself; an exception out of it or out of `requests`
    (the caller went away) ends the stream and cancels what is still running.
    """
    done: asyncio.Queue[ResponseT | _EndOfStream] = asyncio.Queue()
    running: set[asyncio.Task[None]] = set()

    async def run(request: RequestT) -> None:
        done.put_nowait(await answer(request))

    async def read() -> None:
        try:
            async for request in requests:
                task = asyncio.create_task(run(request))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.gather(*running)
        finally:
            done.put_nowait(_EndOfStream())

    reader = asyncio.create_task(read())
    try:
        while not isinstance(item := await done.get(), _EndOfStream):
            yield item
        reader.result()  # re-raises what ended the reading early
    finally:
        reader.cancel()
        for task in running:
            task.cancel()
        await asyncio.gather(reader, *running, return_exceptions=True)
