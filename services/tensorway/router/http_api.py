"""Triton's V2 HTTP/REST protocol (KServe's open inference protocol), served by the router on a
port of its own, so `tritonclient.http` code (sync and asyncio), KServe and MLServer clients work
against the mesh unchanged, JSON tensors and binary ones alike.

A thin door onto the router's Triton gRPC API: each HTTP call becomes the request message of the
matching `inference.GRPCInferenceService` method and goes to the same `TritonServicer`, whose
answer becomes the HTTP body. So both doors resolve models, route (weights, the sticky route key
header, breakers, retries, limits), validate and answer alike, and what the gRPC API learns the
HTTP one serves too. The body's own layout (JSON, the binary tensor extension) is converted in
`tensors.v2_http`.

Identity comes in the headers Envoy sets from the verified token (`x-tenant-id`,
`x-tensorway-scopes`), with the request id and trace context, exactly as gRPC metadata does.
Errors are Triton's HTTP errors: a JSON `{"error": "..."}` with the status Triton uses (400 for
a bad request, 404 for an unknown model, 429 past a limit, 503 when no endpoint can serve),
carrying tensorway's own messages; anything unexpected is a generic 500.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, cast

import grpc
import orjson
from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import service_pb2 as triton

from tensorway.router.triton_api import TritonServicer
from tensorway.runtime import context, errors, metrics, tracing
from tensorway.tensors import v2_http

logger = logging.getLogger(__name__)

METRICS_SERVICE = "kserve.v2.http"
"""The `grpc_service` label of the HTTP door's calls in the server metrics."""
# Envoy tells its upstream how long the route gives a request: the request's deadline.
EXPECTED_TIMEOUT_HEADER = "x-envoy-expected-rq-timeout-ms"
# Triton's HTTP status for each code (tritonserver's HttpCodeFromError), plus what only a mesh says.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_JSON = "application/json"
_BINARY = "application/octet-stream"


class HttpCallContext:
    """What the Triton servicer reads of a gRPC call's context, from an HTTP request: its
    metadata (the headers, named in lower case as gRPC names them) and its deadline."""

    def __init__(self, metadata: list[tuple[str, str]], time_remaining: float | None) -> None:
        self._metadata = metadata
        self._time_remaining = time_remaining

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return self._time_remaining

    def set_code(self, code: Any) -> None:
        """Generated servicer methods that are left out set a code before they raise."""

    def set_details(self, details: str) -> None:
        """As `set_code`."""


Handler = Callable[[web.Request, HttpCallContext], Awaitable[web.StreamResponse]]


class HttpError(Exception):
    """A refusal the HTTP layer makes itself (a body it cannot decode)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, retry_after: timedelta | None = None) -> web.Response:
    """Triton's HTTP error: `{"error": message}` with `status`."""
    headers = (
        {} if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after.total_seconds())))}
    )
    return web.Response(
        status=status, body=orjson.dumps({"error": message}), content_type=_JSON, headers=headers
    )


def _mapped(error: BaseException) -> tuple[grpc.StatusCode, web.Response]:
    """The status code and HTTP answer for an exception out of a handler; internals never leak."""
    if isinstance(error, errors.TensorwayError):
        return error.code, error_response(
            HTTP_STATUS.get(error.code, 500),
            errors.clipped(error.message),
            getattr(error, "retry_after", None),
        )
    if isinstance(error, grpc.aio.AioRpcError):
        # A downstream tensorway service chose the code and safe details, as the gRPC API passes on.
        return error.code(), error_response(HTTP_STATUS.get(error.code(), 500), error.details() or "")
    if isinstance(error, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, error_response(501, "the mesh does not serve this call yet")
    if isinstance(error, HttpError):
        code = grpc.StatusCode.INVALID_ARGUMENT if error.status < 500 else grpc.StatusCode.INTERNAL
        return code, error_response(error.status, error.message)
    logger.error("unhandled error", exc_info=error)
    return grpc.StatusCode.INTERNAL, error_response(500, errors.GENERIC_INTERNAL_MESSAGE)


def _json_value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        named = field.enum_type.values_by_number.get(value)
        return value if named is None else named.name
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.decode(errors="replace")
    return value


def message_json(message: Any) -> dict[str, Any]:
    """A Triton message as Triton's HTTP API writes it: proto field names, fields without presence
    printed even when unset, and 64-bit integers as JSON numbers (protobuf's own JSON makes them
    strings, which Triton's HTTP server does not)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _json_value(value_field, item) for key, item in value.items()}
        elif field.label == FieldDescriptor.LABEL_REPEATED:
            out[field.name] = [_json_value(field, item) for item in value]
        elif field.has_presence:
            if message.HasField(field.name):
                out[field.name] = _json_value(field, value)
        else:
            out[field.name] = _json_value(field, value)
    return out


def _json(message: Any) -> web.Response:
    return web.Response(body=orjson.dumps(message_json(message)), content_type=_JSON)


async def _body(request: web.Request) -> bytes:
    """The request body. aiohttp inflates a gzip or deflate one (tritonclient.http's
    request_compression_algorithm) as it reads it, and refuses one past the size cap with 413."""
    try:
        return await request.read()
    except web.HTTPException:
        raise
    except Exception as error:  # whatever the decoder raises, the bytes are the caller's
        raise HttpError(400, f"the request body cannot be read: {error}") from None


class V2HttpApi:
    """The V2 HTTP/REST routes, answered by the router's Triton servicer."""

    def __init__(self, servicer: TritonServicer, max_body_bytes: int) -> None:
        self._servicer = servicer
        self._max_body_bytes = max_body_bytes

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[_v2_refusals])
        add = app.router.add_route
        add("GET", "/v2/health/live", self._observed("ServerLive", self.health_live))
        add("GET", "/v2/health/ready", self._observed("ServerReady", self.health_ready))
        add("GET", "/v2", self._observed("ServerMetadata", self.server_metadata))
        add("POST", "/v2/repository/index", self._observed("RepositoryIndex", self.repository_index))
        add("GET", "/v2/models/stats", self._observed("ModelStatistics", self.statistics))
        # Versions are numbers in Triton's paths: any other one is a path it does not have (404).
        for model in ("/v2/models/{model}", "/v2/models/{model}/versions/{version:[0-9]+}"):
            add("GET", model, self._observed("ModelMetadata", self.model_metadata))
            add("GET", f"{model}/ready", self._observed("ModelReady", self.model_ready))
            add("GET", f"{model}/config", self._observed("ModelConfig", self.model_config))
            add("GET", f"{model}/stats", self._observed("ModelStatistics", self.statistics))
            add("POST", f"{model}/infer", self._observed("ModelInfer", self.infer))
        return app

    @staticmethod
    def _observed(method: str, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """`handler` with request context, a span, metrics and the error mapping around each call,
        as the gRPC server interceptor puts them around each RPC; `method` is the Triton gRPC
        method the call stands for."""
        in_flight = metrics.IN_FLIGHT.labels(METRICS_SERVICE, method)
        span_name = f"{METRICS_SERVICE}/{method}"

        async def observed(request: web.Request) -> web.StreamResponse:
            metadata = [(key.lower(), value) for key, value in request.headers.items()]
            remaining = _expected_timeout(request)
            token = context.current.set(context.from_metadata(metadata, remaining))
            started = time.perf_counter()
            in_flight.inc()
            code = grpc.StatusCode.OK
            span_scope = tracing.server_span(
                span_name, metadata, {"http.request.method": request.method, "url.path": request.path}
            )
            try:
                with span_scope as span:
                    try:
                        response = await handler(request, HttpCallContext(metadata, remaining))
                    except web.HTTPException as refusal:
                        # aiohttp's own refusals while reading the body (413 past the size cap).
                        code = grpc.StatusCode.INVALID_ARGUMENT
                        response = error_response(refusal.status, refusal.reason)
                    except asyncio.CancelledError:
                        code = grpc.StatusCode.CANCELLED
                        raise
                    except Exception as error:  # every escape gets one mapped answer
                        code, response = _mapped(error)
                    span.set_attribute("http.response.status_code", response.status)
                    return response
            finally:
                in_flight.dec()
                metrics.HANDLED.labels(METRICS_SERVICE, method, code.name).inc()
                metrics.HANDLING_SECONDS.labels(METRICS_SERVICE, method, code.name).observe(
                    time.perf_counter() - started
                )
                context.current.reset(token)

        return observed

    async def _call(self, method: str, request: Any, call: HttpCallContext) -> Any:
        """The Triton servicer's answer to `request`, as its gRPC API gives it."""
        answer = getattr(self._servicer, method)(request, cast(grpc.aio.ServicerContext[Any, Any], call))
        return await answer if inspect.isawaitable(answer) else answer

    async def health_live(self, request: web.Request, call: HttpCallContext) -> web.Response:
        live = (await self._call("ServerLive", triton.ServerLiveRequest(), call)).live
        return web.Response() if live else error_response(400, "the router is not live")

    async def health_ready(self, request: web.Request, call: HttpCallContext) -> web.Response:
        ready = (await self._call("ServerReady", triton.ServerReadyRequest(), call)).ready
        return web.Response() if ready else error_response(400, "the router has no route table yet")

    async def server_metadata(self, request: web.Request, call: HttpCallContext) -> web.Response:
        return _json(await self._call("ServerMetadata", triton.ServerMetadataRequest(), call))

    async def repository_index(self, request: web.Request, call: HttpCallContext) -> web.Response:
        body = await _body(request)
        asked = _json_object(body) if body.strip() else {}
        ready = asked.get("ready", False)
        if not isinstance(ready, bool):
            raise HttpError(400, "'ready' must be true or false")
        index = await self._call("RepositoryIndex", triton.RepositoryIndexRequest(ready=ready), call)
        return web.Response(
            body=orjson.dumps([message_json(model) for model in index.models]), content_type=_JSON
        )

    async def model_metadata(self, request: web.Request, call: HttpCallContext) -> web.Response:
        model, version = _model_of(request)
        return _json(
            await self._call("ModelMetadata", triton.ModelMetadataRequest(name=model, version=version), call)
        )

    async def model_ready(self, request: web.Request, call: HttpCallContext) -> web.Response:
        model, version = _model_of(request)
        answer = await self._call("ModelReady", triton.ModelReadyRequest(name=model, version=version), call)
        if answer.ready:
            return web.Response()
        return error_response(
            400, f"model {model!r} is not ready" + (f" at version {version}" if version else "")
        )

    async def model_config(self, request: web.Request, call: HttpCallContext) -> web.Response:
        model, version = _model_of(request)
        answer = await self._call("ModelConfig", triton.ModelConfigRequest(name=model, version=version), call)
        return web.Response(body=orjson.dumps(message_json(answer.config)), content_type=_JSON)

    async def statistics(self, request: web.Request, call: HttpCallContext) -> web.Response:
        model, version = _model_of(request)
        return _json(
            await self._call(
                "ModelStatistics", triton.ModelStatisticsRequest(name=model, version=version), call
            )
        )

    async def infer(self, request: web.Request, call: HttpCallContext) -> web.Response:
        model, version = _model_of(request)
        body = await _body(request)
        parsed = v2_http.parse_infer_request(model, version, body, request.headers.get(v2_http.HEADER_LENGTH))
        answer = await self._call("infer_message", parsed.request, call)
        payload, header_length = v2_http.infer_response_body(parsed, answer)
        if header_length is None:
            return web.Response(body=payload, content_type=_JSON)
        return web.Response(
            body=payload, content_type=_BINARY, headers={v2_http.HEADER_LENGTH: str(header_length)}
        )


@web.middleware
async def _v2_refusals(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own answers to paths and methods the protocol does not have (404, 405), as V2
    error bodies."""
    try:
        return await handler(request)
    except web.HTTPException as refusal:
        if refusal.status < 400:
            raise
        return error_response(refusal.status, refusal.reason)


def _model_of(request: web.Request) -> tuple[str, str]:
    return request.match_info.get("model", ""), request.match_info.get("version", "")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise HttpError(400, f"the request body is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return value


def _expected_timeout(request: web.Request) -> float | None:
    value = request.headers.get(EXPECTED_TIMEOUT_HEADER, "")
    return int(value) / 1000 if value.isdigit() and int(value) > 0 else None


class V2HttpServer:
    """The HTTP door's server: its port is bound when it is made (0 takes a free one, known at
    once), it serves from `start()` and stops, after its calls in flight, in `stop()`."""

    def __init__(self, api: V2HttpApi, host: str, port: int, grace: timedelta) -> None:
        self._runner = web.AppRunner(
            api.application(), access_log=None, shutdown_timeout=grace.total_seconds()
        )
        try:
            self._socket = socket.create_server((host, port), family=_family(host))
        except OSError as error:
            raise OSError(f"router: cannot bind HTTP {host}:{port} (address in use?)") from error
        self.port: int = self._socket.getsockname()[1]
        self._started = False
        self._stopped = False

    async def start(self) -> None:
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket).start()
        self._started = True
        logger.info("serving the V2 HTTP protocol", extra={"port": self.port})

    async def stop(self) -> None:
        """Stop taking calls and finish those in flight. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._started:
            await self._runner.cleanup()
        self._socket.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
