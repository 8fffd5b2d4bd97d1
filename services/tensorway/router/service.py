"""The router service: settings, the server it runs, and its tensorway InferenceService servicer.

`tensorway serve router` builds `Settings` from the environment (`TENSORWAY_ROUTER_...`) and
calls `create`; tests call `create` with their own settings and, if they like, their own
`RouteSource` in place of the registry.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from pydantic_settings import SettingsConfigDict

from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.ratelimit.leases import QuotaLeases, RedisLeaseStore
from tensorway.ratelimit.limits import LimitsFile
from tensorway.router import http_api, triton_api
from tensorway.router.breaker import BreakerPolicy
from tensorway.router.dispatch import Router, RouterPolicy, status_of
from tensorway.router.retry import RetryPolicy
from tensorway.router.routing import RegistryRouteSource, RouteSource, RouteWatcher, route_key
from tensorway.router.serialized import SerializedRequest
from tensorway.router.traffic import TrafficReporter
from tensorway.runtime import ServiceBinding, ServiceServer, ServiceSettings, Unimplemented, create_server
from tensorway.runtime.streams import answer_series_in_order
from tensorway.tensors import wire
from tensorway.tensors.triton import sequence_step

logger = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]
# Where InferStream goes: the orchestrator's own, which takes the same message.
INFER_STREAM_METHOD = f"/{INFERENCE_SERVICE.full_name}/InferStream"
LIMITS_FILE = Path(__file__).with_name("limits.yaml")
"""The global limits the router enforces unless `limits_file` names others."""


class Settings(ServiceSettings):
    """The router's settings, from `TENSORWAY_ROUTER_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="TENSORWAY_ROUTER_", extra="ignore")

    registry_address: str = ""
    """The registry's gRPC address, host:port, whose WatchRoutes stream feeds the route table."""
    initial_routes_timeout: timedelta = timedelta(seconds=5)
    """How long startup waits for the first route table; until it comes, inference is UNAVAILABLE."""
    watch_backoff_max: timedelta = timedelta(seconds=5)
    """Longest pause between attempts to reopen a broken WatchRoutes stream."""
    route_key_header: str = "x-tensorway-route-key"
    """Request header whose value pins a caller to one version of a weighted split."""
    http_port: int = 0
    """Port of Triton's V2 HTTP/REST protocol (`tritonclient.http`), on `host`; 0 takes a free one."""
    max_concurrency: int = 2048
    """Requests in flight past which new ones are shed with RESOURCE_EXHAUSTED and RetryInfo."""
    shed_retry_after: timedelta = timedelta(milliseconds=100)
    """The retry delay a shed request is told."""
    max_attempts: int = 3
    """Attempts per request, the first included; retries go to other endpoints of the pool."""
    retry_budget_ratio: float = 0.2
    """Retries allowed as a share of requests over the last ten seconds..."""
    retry_budget_min_per_second: float = 10.0
    """...plus this many per second."""
    breaker_consecutive_failures: int = 5
    """An endpoint's breaker opens after this many failures in a row..."""
    breaker_failure_rate: float = 0.5
    """...or when this share of its last `breaker_window` calls failed."""
    breaker_window: int = 20
    """Calls the failure rate is measured over."""
    breaker_open_for: timedelta = timedelta(seconds=1)
    """How long an open breaker waits before it lets one probe request through."""
    shadow_max_in_flight: int = 256
    """Shadow calls in flight past which new copies are dropped."""
    shadow_mismatch_samples: int = 10
    """Shadow answers that differ from the primary's are all counted; this many of each model
    version a minute are also logged with their request id and the outputs that differ."""
    stream_max_in_flight: int = 64
    """Requests of one stream in flight at once (until each one's answer is sent); past them the
    stream is not read until an answer goes out, so the client is held back by flow control."""
    max_sequences: int = 65536
    """Live stateful sequences whose endpoint the router remembers; beyond, the least recently
    used are forgotten."""
    redis_url: str | None = None
    """Redis, where every replica leases slices of the global limits' windows; None: no global
    limits (Envoy's local per-tenant limits still apply)."""
    limits_file: Path = LIMITS_FILE
    """The global limits' YAML file (per tenant and per model, in requests, rows and bytes)."""
    limits_slice_share: float = 0.05
    """The share of a limit one lease refill takes from Redis (at least one unit): smaller slices
    waste less of a window, larger ones ask Redis less often. At most one slice per replica per
    limit key goes unused in a window."""
    limits_redis_timeout: timedelta = timedelta(milliseconds=100)
    """How long a lease refill may take before the limits file's redis_failure mode decides."""
    limits_redis_outage_backoff: timedelta = timedelta(seconds=1)
    """After Redis fails, how long limits answer by their failure mode without asking it."""
    limits_closed_retry_after: timedelta = timedelta(seconds=1)
    """The retry delay of requests a fail-closed limit refuses while Redis is down."""
    traffic_report_interval: timedelta = timedelta(seconds=5)
    """How often the router reports what each model version answered to the registry, whose
    measured rollouts judge by it (`traffic`)."""

    def policy(self) -> RouterPolicy:
        return RouterPolicy(
            max_concurrency=self.max_concurrency,
            shed_retry_after=self.shed_retry_after,
            shadow_max_in_flight=self.shadow_max_in_flight,
            shadow_mismatch_samples=self.shadow_mismatch_samples,
            max_sequences=self.max_sequences,
            max_message_bytes=self.max_message_bytes,
            retry=RetryPolicy(
                max_attempts=self.max_attempts,
                budget_ratio=self.retry_budget_ratio,
                budget_min_per_second=self.retry_budget_min_per_second,
            ),
            breaker=BreakerPolicy(
                consecutive_failures=self.breaker_consecutive_failures,
                failure_rate=self.breaker_failure_rate,
                window=self.breaker_window,
                open_for=self.breaker_open_for,
            ),
        )


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Thin: the request goes to the router's core as it is, the answer comes back as it is.

    Infer takes and returns serialized messages (see `add_to_server`): the router forwards them
    without parsing their tensors.
    """

    def __init__(
        self,
        router: Router,
        route_key_header: str,
        stream_max_in_flight: int,
        decoupled: Callable[[str, str], Awaitable[bool]],
    ) -> None:
        """`decoupled(model, version)` says whether a model answers a request with a series."""
        self._router = router
        self._route_key_header = route_key_header
        self._stream_max_in_flight = stream_max_in_flight
        self._decoupled = decoupled

    async def Infer(  # type: ignore[override]
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        parsed = SerializedRequest.parse(request)
        if await self._decoupled(parsed.model, parsed.version):
            # Refused here, before an orchestrator would, so the mistake never counts against it.
            raise Unimplemented(
                "Infer doesn't support models with decoupled transaction policy: "
                "use InferStream or StreamInfer"
            )
        return await self._router.infer(parsed, route_key(context, self._route_key_header))

    async def InferStream(  # type: ignore[override]
        self, request: pb.InferStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """The orchestrator's serialized InferStreamResponses, returned as they came."""
        async for answer in self._router.infer_series(
            SerializedRequest.of(request.request),
            route_key(context, self._route_key_header),
            INFER_STREAM_METHOD,
            bidi=False,
            framed=_infer_stream_request,
        ):
            yield answer

    async def StreamInfer(
        self,
        request_iterator: AsyncIterator[pb.StreamInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.StreamInferResponse]:
        key = route_key(context, self._route_key_header)

        async def answers(item: pb.StreamInferRequest) -> AsyncIterator[pb.StreamInferResponse]:
            request, request_id = SerializedRequest.of(item.request), item.request.id
            try:
                if await self._decoupled(request.model, request.version):
                    async for answer in self._router.infer_series(
                        request, key, INFER_STREAM_METHOD, bidi=False, framed=_infer_stream_request
                    ):
                        yield pb.StreamInferResponse(
                            id=request_id, response=pb.InferStreamResponse.FromString(answer).response
                        )
                    return
                response = await self._router.infer(request, key)
            except Exception as error:
                yield pb.StreamInferResponse(id=request_id, error=status_of(error))
                return
            yield pb.StreamInferResponse(id=request_id, response=pb.InferResponse.FromString(response))

        def sequence_of(item: pb.StreamInferRequest) -> tuple[str, str] | None:
            step = sequence_step(item.request.parameters)
            return None if step is None else (item.request.model_name, step.id)

        async for response in answer_series_in_order(
            request_iterator, answers, self._stream_max_in_flight, sequence_of
        ):
            yield response

    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelMetadataResponse:
        route, version = self._router.describe(request.model_name, request.model_version)
        return pb.GetModelMetadataResponse(
            name=route.model,
            versions=list(route.versions),
            platform=version.platform,
            inputs=version.inputs,
            outputs=version.outputs,
            max_batch_size=version.max_batch_size,
        )


def _infer_stream_request(request: bytes) -> bytes:
    """A serialized InferRequest as the InferStreamRequest that carries it."""
    return wire.message_field(pb.InferStreamRequest.REQUEST_FIELD_NUMBER, request)


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """The generated `add_InferenceServiceServicer_to_server`, except that Infer's request and
    answer, and InferStream's answers, stay serialized."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Infer": grpc.unary_unary_rpc_method_handler(servicer.Infer),
        "InferStream": grpc.unary_stream_rpc_method_handler(
            servicer.InferStream, request_deserializer=pb.InferStreamRequest.FromString
        ),
        "StreamInfer": grpc.stream_stream_rpc_method_handler(
            servicer.StreamInfer,
            request_deserializer=pb.StreamInferRequest.FromString,
            response_serializer=pb.StreamInferResponse.SerializeToString,
        ),
        "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelMetadata,
            request_deserializer=pb.GetModelMetadataRequest.FromString,
            response_serializer=pb.GetModelMetadataResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(INFERENCE_SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(INFERENCE_SERVICE.full_name, handlers)


async def create(settings: Settings, route_source: RouteSource | None = None) -> tuple[ServiceServer, int]:
    """The router's server, watching routes from `route_source` (the registry by default)."""
    if route_source is None:
        if not settings.registry_address:
            raise ValueError("the router needs the registry's address: set TENSORWAY_ROUTER_REGISTRY_ADDRESS")
        route_source = RegistryRouteSource(settings.registry_address)
    watcher = RouteWatcher(route_source, backoff_max=settings.watch_backoff_max)
    limits = None
    if settings.redis_url is not None:
        limits = QuotaLeases(
            LimitsFile.load(settings.limits_file),
            RedisLeaseStore.connect(settings.redis_url, settings.limits_redis_timeout),
            slice_share=settings.limits_slice_share,
            outage_backoff=settings.limits_redis_outage_backoff,
            closed_retry_after=settings.limits_closed_retry_after,
        )
    router = Router(watcher, settings.policy(), limits=limits)
    triton_servicer = triton_api.TritonServicer(
        router, settings.route_key_header, settings.stream_max_in_flight
    )
    server, port = create_server(
        "router",
        settings,
        [
            ServiceBinding(
                add_to_server,
                InferenceServicer(
                    router,
                    settings.route_key_header,
                    settings.stream_max_in_flight,
                    triton_servicer.decoupled,
                ),
                INFERENCE_SERVICE,
            ),
            ServiceBinding(triton_api.add_to_server, triton_servicer, triton_api.SERVICE),
        ],
    )
    # Stopped in reverse order: the router's channels close first, then the watcher.
    if limits is not None:
        server.on_stop(limits.close)
    server.on_stop(watcher.stop)
    server.on_stop(router.close)
    # Triton's V2 HTTP/REST protocol on a port of its own, answered by the same router; it stops
    # taking calls before the router's channels close.
    http = http_api.V2HttpServer(
        http_api.V2HttpApi(triton_servicer, settings.max_message_bytes),
        settings.host,
        settings.http_port,
        settings.grace,
    )
    server.ports["http"] = http.port
    server.on_start(http.start)
    server.on_stop(http.stop)
    if settings.registry_address:
        reporter = TrafficReporter(
            settings.registry_address, f"{socket.gethostname()}:{port}", settings.traffic_report_interval
        )
        server.on_start(reporter.start)
        server.on_stop(reporter.stop)
    watcher.start()
    if not await watcher.wait_loaded(settings.initial_routes_timeout):
        logger.warning("no route table from the registry yet; inference is UNAVAILABLE until it comes")
    return server, port
