"""The server interceptor every tensorway server runs, and its client-side twin.

Server side, for each call: request context from metadata, a server span, RPC metrics, and the
one mapping from exceptions to status codes. Client side: the request id, tenant, trace context
and remaining deadline ride along on every downstream call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
from grpc.aio import AioRpcError, ServicerContext

from tensorway.runtime import context, errors, metrics, tracing

logger = logging.getLogger(__name__)

# Long-lived infrastructure streams that would only blur the RPC metrics.
UNOBSERVED_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
STATUS_DETAILS_KEY = "grpc-status-details-bin"


async def abort_for(exc: BaseException, ctx: ServicerContext[Any, Any]) -> None:
    """Abort the call with the status this exception maps to. Always raises."""
    if isinstance(exc, errors.TensorwayError):
        status = exc.to_grpc_status()
        await ctx.abort(status.code, status.details, status.trailing_metadata)
    if isinstance(exc, AioRpcError):
        # A downstream tensorway service already chose the code and safe details: pass them on.
        downstream = [
            (key, value) for key, value in (exc.trailing_metadata() or ()) if key == STATUS_DETAILS_KEY
        ]
        await ctx.abort(exc.code(), exc.details() or "", tuple(downstream))
    if isinstance(exc, NotImplementedError):
        # What generated servicers raise for a method the service leaves out.
        status = errors.Unimplemented("this server does not serve the method").to_grpc_status()
        await ctx.abort(status.code, status.details, status.trailing_metadata)
    logger.error("unhandled error", exc_info=exc)
    status = errors.internal_status()
    await ctx.abort(status.code, status.details, status.trailing_metadata)


def _code_of(exc: BaseException | None, ctx: ServicerContext[Any, Any]) -> str:
    if exc is None:
        code = ctx.code()
        return code.name if isinstance(code, grpc.StatusCode) else "OK"
    if isinstance(exc, errors.TensorwayError):
        return exc.code.name
    if isinstance(exc, AioRpcError):
        return exc.code().name
    if isinstance(exc, NotImplementedError):
        return "UNIMPLEMENTED"
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(exc, grpc.aio.AbortError):
        code = ctx.code()
        return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return "INTERNAL"


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Context, tracing, metrics and error mapping around every RPC handler."""

    def __init__(self) -> None:
        # intercept_service runs on every call: wrap each method's handler once.
        self._wrapped: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        full_method: str = handler_call_details.method
        wrapped = self._wrapped.get(full_method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        service, _, method = full_method.lstrip("/").partition("/")
        if handler is None or service in UNOBSERVED_SERVICES:
            return handler
        wrapped = _wrap(handler, _Observer(service, method))
        self._wrapped[full_method] = wrapped
        return wrapped


class _Observer:
    """The per-call scope of one method: context, span, metrics and the error mapping.

    A plain class rather than an `asynccontextmanager`: the generator machinery of one costs
    several microseconds on every call, on every hop of the mesh.
    """

    def __init__(self, service: str, method: str) -> None:
        self.service, self.method = service, method
        self.in_flight = metrics.IN_FLIGHT.labels(service, method)
        # By status code, looked up once: `labels()` takes a lock and hashes its labels on every call.
        self._by_code: dict[str, tuple[Any, Any]] = {}
        self.span_name = f"{service}/{method}"
        self.span_attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

    def __call__(self, ctx: ServicerContext[Any, Any]) -> _Observed:
        return _Observed(self, ctx)

    def finished(self, code: str, seconds: float) -> None:
        self.in_flight.dec()
        children = self._by_code.get(code)
        if children is None:
            children = self._by_code[code] = (
                metrics.HANDLED.labels(self.service, self.method, code),
                metrics.HANDLING_SECONDS.labels(self.service, self.method, code),
            )
        children[0].inc()
        children[1].observe(seconds)


class _Observed:
    """One call inside its method's `_Observer`."""

    __slots__ = ("_ctx", "_observer", "_span", "_span_scope", "_started", "_token")

    def __init__(self, observer: _Observer, ctx: ServicerContext[Any, Any]) -> None:
        self._observer, self._ctx = observer, ctx

    async def __aenter__(self) -> None:
        ctx, observer = self._ctx, self._observer
        metadata = ctx.invocation_metadata()
        self._token = context.current.set(context.from_metadata(metadata, ctx.time_remaining()))
        self._started = time.perf_counter()
        observer.in_flight.inc()
        self._span_scope = tracing.server_span(observer.span_name, metadata, observer.span_attributes)
        self._span = self._span_scope.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
        ctx = self._ctx
        try:
            if exc is not None and not isinstance(
                exc, grpc.aio.AbortError | asyncio.CancelledError | GeneratorExit
            ):
                # Every other escape gets one mapped status, inside the span.
                self._span.set_attribute("rpc.grpc.status_code", _code_of(exc, ctx))
                try:
                    await abort_for(exc, ctx)
                except BaseException as aborted:
                    self._span_scope.__exit__(type(aborted), aborted, aborted.__traceback__)
                    raise
            self._span_scope.__exit__(exc_type, exc, traceback)
        finally:
            self._observer.finished(_code_of(exc, ctx), time.perf_counter() - self._started)
            # A streaming response's generator that gRPC closes from another task (the call was
            # cancelled) ends here in another context, where the token was never set: nothing to undo.
            with contextlib.suppress(ValueError):
                context.current.reset(self._token)


@dataclass(frozen=True)
class _Undecodable:
    """Request bytes the method's deserializer refused, and why."""

    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The deserializer, except that bytes it refuses become `_Undecodable`: gRPC would answer a
    deserializer's exception with INTERNAL or UNKNOWN, before any handler could say INVALID_ARGUMENT."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # whatever the parser raises, the bytes are the caller's
            return _Undecodable(str(exc))

    return deserialize


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument(
            "the request is not a serialized message of the method's type",
            [errors.FieldViolation("request", request.error)],
        )
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def _wrap(handler: Any, observed: _Observer) -> Any:
    """The same handler with every call run inside `observed`."""
    serializers = {
        "request_deserializer": _tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        answer = _answered_once(handler.unary_unary, _decoded, observed)
        return grpc.unary_unary_rpc_method_handler(answer, **serializers)
    if handler.unary_stream is not None:
        answers = _answered_in_series(handler.unary_stream, _decoded, observed)
        return grpc.unary_stream_rpc_method_handler(answers, **serializers)
    if handler.stream_unary is not None:
        answer = _answered_once(handler.stream_unary, _decoded_stream, observed)
        return grpc.stream_unary_rpc_method_handler(answer, **serializers)
    answers = _answered_in_series(handler.stream_stream, _decoded_stream, observed)
    return grpc.stream_stream_rpc_method_handler(answers, **serializers)


def _answered_once(
    inner: Callable[..., Awaitable[Any]], decoded: Callable[[Any], Any], observed: _Observer
) -> Callable[..., Awaitable[Any]]:
    """A handler of one answer (to a request or a stream of them), run inside `observed`."""

    async def answer(request: Any, ctx: ServicerContext[Any, Any]) -> Any:
        async with observed(ctx):
            return await inner(decoded(request), ctx)

    return answer


def _answered_in_series(
    inner: Callable[..., AsyncIterator[Any]], decoded: Callable[[Any], Any], observed: _Observer
) -> Callable[..., AsyncIterator[Any]]:
    """A handler of a series of answers (to a request or a stream of them), run inside `observed`."""

    async def answers(request: Any, ctx: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async with observed(ctx):
            async for response in inner(decoded(request), ctx):
                yield response

    return answers


def downstream_metadata() -> tuple[tuple[str, str], ...]:
    """What a downstream call carries of the current request: its id, tenant and trace context."""
    return (*context.outgoing_metadata(), *tracing.inject())


def downstream_timeout(timeout: float | None = None) -> float | None:
    """The downstream call's timeout: `timeout`, cut to what is left of the current request's."""
    request = context.current.get()
    remaining = request.time_remaining() if request is not None else None
    if remaining is None:
        return timeout
    return max(0.0, remaining if timeout is None else min(timeout, remaining))


class ClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Carries the request id, tenant, trace context and remaining deadline downstream.

    An intercepted call runs its interceptors in a task of its own; a hot path saves that by
    calling through a plain channel with `downstream_metadata()` and `downstream_timeout()`.
    """

    @staticmethod
    def _propagate(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        present = {key for key, _ in metadata}
        for key, value in downstream_metadata():
            if key not in present:
                metadata.add(key, value)
        return grpc.aio.ClientCallDetails(
            details.method,
            downstream_timeout(details.timeout),
            metadata,
            details.credentials,
            details.wait_for_ready,
        )

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._propagate(client_call_details), request)

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._propagate(client_call_details), request)

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._propagate(client_call_details), request_iterator)

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._propagate(client_call_details), request_iterator)


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _SendsMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = list(metadata)

    def _details(self, details: Any) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*self._metadata, *(details.metadata or ())],
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def sending_metadata(channel: grpc.Channel, metadata: Sequence[tuple[str, str]]) -> grpc.Channel:
    """A blocking `channel` whose unary and server-streaming calls all carry `metadata` (a token,
    or an internal caller's identity) before their own."""
    return grpc.intercept_channel(channel, _SendsMetadata(metadata))
