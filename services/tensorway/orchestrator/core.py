"""The orchestrator's logic: check a request against its model, carry it to a Triton of the pool
within its deadline and the in-flight limit, and hand back Triton's answer."""

from __future__ import annotations

import asyncio
import logging
import time
from asyncio import FIRST_COMPLETED
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, TypeVar

from tritonclient.grpc import service_pb2 as triton

from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.orchestrator import metrics
from tensorway.orchestrator.models import ModelCatalog
from tensorway.orchestrator.pool import TritonEndpoint, TritonPool
from tensorway.orchestrator.streams import EMPTY_FINAL_RESPONSE_PARAMETER, FINAL_RESPONSE_PARAMETER
from tensorway.orchestrator.triton_errors import (
    UNARY_ON_DECOUPLED,
    ModelGone,
    from_stream_error,
    sequence_lost,
)
from tensorway.orchestrator.validation import check_triton_contents, validate_request
from tensorway.runtime import (
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    TensorwayError,
    Unavailable,
    Unimplemented,
    context,
)
from tensorway.runtime.errors import GENERIC_INTERNAL_MESSAGE, reason_name
from tensorway.runtime.streams import answer_in_order
from tensorway.tensors.signatures import ModelSignature
from tensorway.tensors.triton import (
    SequenceStep,
    from_triton_response,
    raw_inputs,
    sequence_step,
    to_triton_request,
    triton_raw_inputs,
    triton_sequence_step,
)

logger = logging.getLogger(__name__)
AnswerT = TypeVar("AnswerT")


class Orchestrator:
    """Runs inference requests on the pool's Tritons.

    At most `max_in_flight` requests are at Triton at once; up to `max_queued` more wait for a
    slot, and beyond that requests are refused with RESOURCE_EXHAUSTED. A request without a
    deadline gets `default_timeout`.

    A Triton that cannot take a request (down, its stream broken, the model gone from it) is
    passed over and the request runs on another Triton of the pool: inference has no side
    effects, so running it again is safe. With `hedge_after`, a request the chosen Triton has
    not answered by then is sent to a second one as well, and the first answer wins, so a
    stalled Triton costs its requests that delay rather than their deadline.

    A stateful sequence (the sequence_id parameter) keeps its state in the Triton that ran its
    START, so its requests all go there, are never hedged and never move: if that Triton cannot
    take one, the request fails with ABORTED rather than restarting the sequence elsewhere.
    """

    def __init__(
        self,
        pool: TritonPool,
        catalog: ModelCatalog,
        *,
        max_in_flight: int,
        max_queued: int,
        default_timeout: timedelta,
        hedge_after: timedelta | None = None,
        max_sequences: int = 65536,
    ) -> None:
        self._pool = pool
        self._hedge_after = None if hedge_after is None else hedge_after.total_seconds()
        self._catalog = catalog
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_queued = max_queued
        self._queued = 0
        self._default_timeout = default_timeout.total_seconds()
        # (model, sequence id) → the address of the Triton holding the sequence's state.
        self._sequences: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._max_sequences = max_sequences
        # Metric children by label values; models are those the catalog knows (or UNKNOWN_MODEL).
        self._latency_children: dict[tuple[str, str], Any] = {}
        self._error_children: dict[tuple[str, str], Any] = {}
        self._slot_children: dict[str, tuple[Any, Any, Any]] = {}

    async def infer(self, request: pb.InferRequest) -> pb.InferResponse:
        """Validate `request` against its model's signature, run it, and return the answer."""

        async def run(signature: ModelSignature) -> pb.InferResponse:
            if signature.decoupled:
                raise Unimplemented(
                    "Infer doesn't support models with decoupled transaction policy: "
                    "use InferStream or StreamInfer"
                )
            raw = raw_inputs(request)
            validate_request(request, signature, raw)
            answer = await self._run_step(
                signature.name, to_triton_request(request, raw), sequence_step(request.parameters)
            )
            return from_triton_response(answer, request)

        return await self._serve(request.model_name, request.model_version, run)

    async def infer_triton(self, request: triton.ModelInferRequest) -> triton.ModelInferResponse:
        """Validate a Triton ModelInferRequest against its model's signature, run it as it is, and
        return Triton's ModelInferResponse, with the caller's id: the request is Triton's message
        already, so nothing is converted either way."""

        async def run(signature: ModelSignature) -> Any:
            if signature.decoupled:
                raise Unimplemented(UNARY_ON_DECOUPLED)
            check_triton_contents(request)
            validate_request(request, signature, triton_raw_inputs(request))
            caller_id = request.id
            answer = await self._run_step(signature.name, request, triton_sequence_step(request.parameters))
            answer.id = caller_id
            return answer

        return await self._serve(request.model_name, request.model_version, run)

    async def _serve(
        self, model_name: str, version: str, run: Callable[[ModelSignature], Awaitable[AnswerT]]
    ) -> AnswerT:
        """`run(signature)` within the request's deadline, counted in the metrics by model and code."""
        async with self._serving(model_name) as served:
            signature = await self._catalog.signature(model_name, version)
            served.model = signature.name
            answer = await run(signature)
        return answer

    @asynccontextmanager
    async def _serving(self, model_name: str) -> AsyncIterator[_Served]:
        """A request within its deadline, counted in the metrics by model (set on the record it
        yields once known) and code."""
        started = time.perf_counter()
        served = _Served()
        code = "OK"
        try:
            async with asyncio.timeout(self._time_remaining()):
                yield served
        except TimeoutError as timeout:
            failure: TensorwayError = DeadlineExceeded(
                f"model {model_name!r} did not answer before the deadline"
            )
            code = failure.code.name
            self._errors(served.model, failure).inc()
            raise failure from timeout
        except TensorwayError as error:
            if isinstance(error, ModelGone):
                self._catalog.forget([served.model])
            code = error.code.name
            self._errors(served.model, error).inc()
            raise
        finally:
            self._latency(served.model, code).observe(time.perf_counter() - started)

    async def infer_series(self, request: pb.InferRequest) -> AsyncIterator[pb.InferResponse]:
        """Every answer to `request`: a decoupled model's series, each answer with Triton's
        `triton_final_response` parameter and the last one true (with no outputs when the model
        ended with the flag alone); any other model's one answer. Raises the mesh error of a
        failure, which ends the series."""
        async with self._serving(request.model_name) as served:
            signature = await self._catalog.signature(request.model_name, request.model_version)
            served.model = signature.name
            raw = raw_inputs(request)
            validate_request(request, signature, raw)
            triton_request = to_triton_request(request, raw)
            if not signature.decoupled:
                answer = await self._run_step(
                    signature.name, triton_request, sequence_step(request.parameters)
                )
                yield from_triton_response(answer, request)
                return
            async for response in self._series(signature.name, triton_request):
                if response.error_message:
                    raise from_stream_error(response.error_message, signature.name)
                yield from_triton_response(response.infer_response, request)

    async def infer_triton_series(
        self, request: triton.ModelInferRequest
    ) -> AsyncIterator[triton.ModelStreamInferResponse]:
        """Every answer to a Triton ModelInferRequest as Triton sends it on a ModelStreamInfer
        stream (ModelStreamInferResponses with the caller's id): a decoupled model's series with
        Triton's final flag, and its empty final answer when the request asks for one; any other
        model's one answer, marked final. A failure is an error answer, which ends the series."""
        caller_id = request.id
        empty_final = request.parameters.get(EMPTY_FINAL_RESPONSE_PARAMETER)
        wants_empty_final = empty_final is not None and empty_final.bool_param
        try:
            async with self._serving(request.model_name) as served:
                signature = await self._catalog.signature(request.model_name, request.model_version)
                served.model = signature.name
                check_triton_contents(request)
                validate_request(request, signature, triton_raw_inputs(request))
                if not signature.decoupled:
                    step = triton_sequence_step(request.parameters)
                    answer = await self._run_step(signature.name, request, step)
                    answer.id = caller_id
                    answer.parameters[FINAL_RESPONSE_PARAMETER].bool_param = True
                    yield triton.ModelStreamInferResponse(infer_response=answer)
                    return
                async for response in self._series(signature.name, request):
                    answer = response.infer_response
                    if not wants_empty_final and _is_empty_final(response):
                        continue  # asked for by the orchestrator to know the end, not by the caller
                    answer.id = caller_id
                    if response.error_message:
                        response.error_message = from_stream_error(
                            response.error_message, signature.name
                        ).message
                    yield response
        except TensorwayError as error:
            yield triton.ModelStreamInferResponse(
                error_message=error.message, infer_response=triton.ModelInferResponse(id=caller_id)
            )

    async def _series(self, model: str, request: Any) -> AsyncIterator[Any]:
        """Triton's stream answers to a request of a decoupled model, through the last one.

        Not moved to another Triton on failure, nor hedged: answers may have reached the caller."""
        in_flight = await self._take_slot(model)
        try:
            endpoint = self._pool.choose(model)
            try:
                async for response in endpoint.infer_series(request):
                    yield response
            except Unavailable as failure:
                endpoint.mark_failed(model, failure)
                raise
        finally:
            self._give_slot_back(in_flight)

    async def _run_step(self, model: str, triton_request: Any, step: SequenceStep | None) -> Any:
        in_flight = await self._take_slot(model)
        try:
            if step is None:
                return await self._run(model, triton_request)
            return await self._run_in_sequence(model, triton_request, step)
        finally:
            self._give_slot_back(in_flight)

    def _latency(self, model: str, code: str) -> Any:
        # Children looked up once: `labels()` takes a lock and hashes its labels on every call.
        child = self._latency_children.get((model, code))
        if child is None:
            child = self._latency_children[(model, code)] = metrics.REQUEST_SECONDS.labels(model, code)
        return child

    def _errors(self, model: str, error: TensorwayError) -> Any:
        reason = reason_name(error.reason)
        child = self._error_children.get((model, reason))
        if child is None:
            child = self._error_children[(model, reason)] = metrics.ERRORS.labels(model, reason)
        return child

    async def _run(self, model: str, request: Any) -> Any:
        """Triton's answer to `request`, from the first Triton of the pool that gives one."""
        if self._hedge_after is None or len(self._pool.endpoints) == 1:
            return await self._run_in_turn(model, request)
        tried: set[str] = set()
        running: dict[asyncio.Future[Any], TritonEndpoint] = {}

        def launch() -> None:
            endpoint = self._pool.choose(model, exclude=tried)
            tried.add(endpoint.address)
            # Each attempt sends its own copy: a stream stamps its request id on what it sends.
            attempt = request if not running else _copy(request)
            running[asyncio.ensure_future(endpoint.infer(attempt))] = endpoint

        launch()
        hedged = self._hedge_after is None
        try:
            while True:
                done, _ = await asyncio.wait(
                    running, timeout=None if hedged else self._hedge_after, return_when=FIRST_COMPLETED
                )
                if not done:
                    hedged = True
                    if len(tried) < len(self._pool.endpoints):
                        launch()
                    continue
                for finished in done:
                    endpoint = running.pop(finished)
                    try:
                        return finished.result()
                    except Unavailable as failure:
                        endpoint.mark_failed(model, failure)
                        if not running:
                            if len(tried) == len(self._pool.endpoints):
                                raise
                            launch()
        finally:
            # The attempts that lost the race, or all of them when this call was cancelled.
            for future in running:
                future.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _run_in_turn(self, model: str, request: Any) -> Any:
        """`_run` where no attempt is hedged (hedging off, or a pool of one Triton): attempts never
        overlap, so each runs in the caller's task, without a task and a wait of its own, which
        cost the hot path tens of microseconds a request."""
        tried: set[str] = set()
        while True:
            endpoint = self._pool.choose(model, exclude=tried)
            tried.add(endpoint.address)
            try:
                return await endpoint.infer(request)
            except Unavailable as failure:
                endpoint.mark_failed(model, failure)
                if len(tried) == len(self._pool.endpoints):
                    raise

    async def _run_in_sequence(self, model: str, request: Any, step: SequenceStep) -> Any:
        """Triton's answer to a request of a sequence, from the Triton that holds the sequence."""
        key = (model, step.id)
        address = None if step.start else self._sequences.get(key)
        if address is None:
            # A START, or a sequence this orchestrator has not seen start (it restarted): the
            # Triton that would take a START now; Triton refuses the request if it is not the one.
            endpoint = self._pool.choose(model)
        else:
            self._sequences.move_to_end(key)
            endpoint = next(e for e in self._pool.endpoints if e.address == address)
            if not endpoint.ready:
                raise sequence_lost(model, step, "Triton", f"Triton {address} is not ready")
        if step.start:
            self._sequences[key] = endpoint.address
            while len(self._sequences) > self._max_sequences:
                self._sequences.popitem(last=False)
        done = False
        try:
            answer = await endpoint.infer(request)
            done = True
            return answer
        except Unavailable as failure:
            endpoint.mark_failed(model, failure)
            if step.start:
                raise
            raise sequence_lost(model, step, "Triton", failure.message) from failure
        finally:
            if step.end or (step.start and not done):
                self._sequences.pop(key, None)

    async def model_metadata(self, request: pb.GetModelMetadataRequest) -> pb.GetModelMetadataResponse:
        """The signature of a model version, as the pool's Tritons declare it."""
        signature = await self._catalog.signature(request.model_name, request.model_version)
        return signature.to_metadata()

    async def stream_infer(
        self, requests: AsyncIterator[pb.StreamInferRequest], max_in_flight: int
    ) -> AsyncIterator[pb.StreamInferResponse]:
        """Run the requests of a stream concurrently, at most `max_in_flight` at once, and answer
        each, success or error, in the order they came."""

        async def answer(item: pb.StreamInferRequest) -> pb.StreamInferResponse:
            request = item.request
            try:
                return pb.StreamInferResponse(id=request.id, response=await self.infer(request))
            except TensorwayError as error:
                return pb.StreamInferResponse(id=request.id, error=error.to_status_proto())
            except Exception:
                logger.exception("stream request %s failed", request.id)
                failure = Internal(GENERIC_INTERNAL_MESSAGE)
                return pb.StreamInferResponse(id=request.id, error=failure.to_status_proto())

        def sequence_of(item: pb.StreamInferRequest) -> tuple[str, str] | None:
            step = sequence_step(item.request.parameters)
            return None if step is None else (item.request.model_name, step.id)

        async for response in answer_in_order(requests, answer, max_in_flight, sequence_of):
            yield response

    def _time_remaining(self) -> float:
        request = context.current.get()
        remaining = request.time_remaining() if request is not None else None
        return self._default_timeout if remaining is None else remaining

    async def _take_slot(self, model: str) -> Any:
        """Wait for a slot at Triton (RESOURCE_EXHAUSTED when too many wait already); returns
        what `_give_slot_back` takes. Two calls rather than an `asynccontextmanager`, whose
        generator machinery costs microseconds on every request."""
        children = self._slot_children.get(model)
        if children is None:
            children = self._slot_children[model] = (
                metrics.QUEUED.labels(model),
                metrics.QUEUE_SECONDS.labels(model),
                metrics.IN_FLIGHT.labels(model),
            )
        queued, queue_seconds, in_flight = children
        if self._slots.locked():
            if self._queued >= self._max_queued:
                raise ResourceExhausted(
                    f"{self._queued} requests are already waiting for Triton",
                    retry_after=timedelta(milliseconds=100),
                    metadata={"model": model},
                )
            waited = time.perf_counter()
            self._queued += 1
            queued.inc()
            try:
                await self._slots.acquire()
            finally:
                self._queued -= 1
                queued.dec()
                queue_seconds.observe(time.perf_counter() - waited)
        else:
            await self._slots.acquire()
            queue_seconds.observe(0)
        in_flight.inc()
        return in_flight

    def _give_slot_back(self, in_flight: Any) -> None:
        in_flight.dec()
        self._slots.release()


class _Served:
    """What a request's metrics are counted under, once its model is known."""

    __slots__ = ("model",)

    def __init__(self) -> None:
        self.model = metrics.UNKNOWN_MODEL


def _is_empty_final(response: Any) -> bool:
    """Triton's empty final answer: the final flag on an answer with no outputs and no error."""
    answer = response.infer_response
    final = answer.parameters.get(FINAL_RESPONSE_PARAMETER)
    return final is not None and final.bool_param and not answer.outputs and not response.error_message


def _copy(message: Any) -> Any:
    copied = type(message)()
    copied.CopyFrom(message)
    return copied
