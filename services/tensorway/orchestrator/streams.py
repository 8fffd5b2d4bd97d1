"""Persistent ModelStreamInfer streams to one Triton, each carrying many requests at once.

A stream gives every request a Triton-side id of its own and pairs each answer with its waiter
by that id, so answers may come back in any order. A request of a decoupled model has a series
of answers, which its waiter takes through the final one. When the stream breaks, every request
waiting on it fails as UNAVAILABLE (the caller may retry elsewhere) and the next request opens
a new stream.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from tensorway.orchestrator import metrics
from tensorway.orchestrator.triton_errors import from_rpc_error, from_stream_error
from tensorway.runtime import Unavailable

logger = logging.getLogger(__name__)

FINAL_RESPONSE_PARAMETER = "triton_final_response"
"""The parameter Triton puts on every answer on a ModelStreamInfer stream (and on no unary one):
whether it is the last answer to its request."""
EMPTY_FINAL_RESPONSE_PARAMETER = "triton_enable_empty_final_response"
"""The request parameter that asks Triton for an empty final answer on a stream when a decoupled
model ends a request with the final flag alone; without it, nothing tells that request's end."""


def is_last_answer(response: Any) -> bool:
    """Whether a ModelStreamInferResponse is the last to its request: it says so, or it is an
    error without the flag (Triton's own request checks refuse a request once, with no flag)."""
    final = response.infer_response.parameters.get(FINAL_RESPONSE_PARAMETER)
    return final.bool_param if final is not None else bool(response.error_message)


class StreamBroken(Unavailable):
    """The stream failed before this request was answered."""


@dataclass(slots=True)
class _Waiter:
    answer: asyncio.Future[Any]
    model: str
    # The call the request was written to; None while it is being written.
    call: Any = None
    # A decoupled request's answers (ModelStreamInferResponses), or the failure that ends them.
    series: asyncio.Queue[Any] | None = None


class InferStream:
    """One bidirectional ModelStreamInfer call to a Triton, multiplexed by request id."""

    def __init__(self, stub: Any, triton: str) -> None:
        self._stub = stub
        self._triton = triton
        self._call: Any = None
        self._readers: set[asyncio.Task[None]] = set()
        self._pending: dict[str, _Waiter] = {}
        self._ids = itertools.count()
        # Two writes may not overlap on one call.
        self._write_lock = asyncio.Lock()

    @property
    def pending(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    async def infer(self, request: Any) -> Any:
        """Send `request` (a Triton ModelInferRequest) and wait for its ModelInferResponse.

        Raises the mesh error for Triton's failure. The caller bounds the wait (deadline).
        """
        request.id = str(next(self._ids))
        waiter = _Waiter(asyncio.get_running_loop().create_future(), request.model_name)
        self._pending[request.id] = waiter
        try:
            waiter.call = await self._send(request)
            if waiter.call is not self._call and not waiter.answer.done():
                # The call ended while the write completed, after its reader failed its requests.
                raise StreamBroken(f"the stream to Triton {self._triton} ended")
            return await waiter.answer
        finally:
            del self._pending[request.id]

    async def infer_series(self, request: Any) -> AsyncIterator[Any]:
        """Send `request` (for a decoupled model, asking for the empty final answer) and yield
        Triton's ModelStreamInferResponses to it, through the last one (`is_last_answer`).

        Raises StreamBroken when the stream fails first. The caller bounds the wait (deadline).
        """
        request.id = str(next(self._ids))
        request.parameters[EMPTY_FINAL_RESPONSE_PARAMETER].bool_param = True
        series: asyncio.Queue[Any] = asyncio.Queue()
        waiter = _Waiter(asyncio.get_running_loop().create_future(), request.model_name, series=series)
        self._pending[request.id] = waiter
        try:
            waiter.call = await self._send(request)
            if waiter.call is not self._call and series.empty():
                raise StreamBroken(f"the stream to Triton {self._triton} ended")
            while True:
                response = await series.get()
                if isinstance(response, BaseException):
                    raise response
                yield response
                if is_last_answer(response):
                    return
        finally:
            del self._pending[request.id]

    async def close(self) -> None:
        """Cancel the call; requests still waiting fail as UNAVAILABLE."""
        if self._call is not None:
            self._call.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def _send(self, request: Any) -> Any:
        async with self._write_lock:
            call = self._call or self._open()
            try:
                await call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # The call ended before this write: the request never left, so one fresh stream
                # may carry it.
                self._forget(call)
                call = self._open()
                try:
                    await call.write(request)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
                    # Triton cannot be reached at all: UNAVAILABLE, so the caller tries elsewhere.
                    self._forget(call)
                    raise StreamBroken(f"cannot open a stream to Triton {self._triton}") from error
            return call

    def _open(self) -> Any:
        # A stream outlives every request, so it must not inherit the deadline, request id or
        # trace of the request that happened to open it.
        outside_any_request = contextvars.Context()
        call = outside_any_request.run(self._stub.ModelStreamInfer)
        self._call = call
        reader = outside_any_request.run(asyncio.ensure_future, self._read(call))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        metrics.STREAMS_OPENED.labels(self._triton).inc()
        return call

    def _forget(self, call: Any) -> None:
        if self._call is call:
            self._call = None

    async def _read(self, call: Any) -> None:
        failure = StreamBroken(f"the stream to Triton {self._triton} ended")
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                self._answer(response)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                logger.warning("stream to Triton %s broke: %s", self._triton, error.details())
            failure = StreamBroken(f"the stream to Triton {self._triton} broke: {error.details()}")
        finally:
            self._forget(call)
            for waiter in self._pending.values():
                if waiter.call is not call:
                    continue
                if waiter.series is not None:
                    waiter.series.put_nowait(failure)
                elif not waiter.answer.done():
                    waiter.answer.set_exception(failure)

    def _answer(self, response: Any) -> None:
        waiter = self._pending.get(response.infer_response.id)
        if waiter is not None and waiter.series is not None:
            waiter.series.put_nowait(response)
            return
        if waiter is None or waiter.answer.done():
            return  # its caller gave up (deadline or cancellation) while Triton worked
        if response.error_message:
            waiter.answer.set_exception(from_stream_error(response.error_message, waiter.model))
        else:
            answer = response.infer_response
            # Framing of the stream to Triton, not part of the answer: the mesh answers each
            # request once, and its Triton API marks stream answers itself, as Triton does.
            if FINAL_RESPONSE_PARAMETER in answer.parameters:
                del answer.parameters[FINAL_RESPONSE_PARAMETER]
            waiter.answer.set_result(answer)


class UnaryInfer:
    """Unary ModelInfer to a Triton, for where a long-lived stream cannot be kept."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub
        self.pending = 0

    async def infer(self, request: Any) -> Any:
        self.pending += 1
        try:
            return await self._stub.ModelInfer(request)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, request.model_name) from error
        finally:
            self.pending -= 1

    async def infer_series(self, request: Any) -> AsyncIterator[Any]:
        """A decoupled model's answers, on a stream of its own that ends with the request."""
        self.pending += 1
        request.parameters[EMPTY_FINAL_RESPONSE_PARAMETER].bool_param = True
        call = self._stub.ModelStreamInfer()
        try:
            await call.write(request)
            await call.done_writing()
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, request.model_name) from error
        finally:
            call.cancel()
            self.pending -= 1
