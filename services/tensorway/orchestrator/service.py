"""The orchestrator service: settings, the gRPC servicer, and `create` for `tensorway serve`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_grpc

from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.orchestrator import metrics
from tensorway.orchestrator.artifacts import model_repositories
from tensorway.orchestrator.core import Orchestrator
from tensorway.orchestrator.models import DeploymentSource, ModelCatalog, ModelPlacement
from tensorway.orchestrator.pool import TritonEndpoint, TritonPool
from tensorway.orchestrator.triton_control import TRITONS_METADATA_KEY, TritonControl, index_response
from tensorway.runtime import ServiceBinding, ServiceServer, ServiceSettings, create_server
from tensorway.runtime.streams import answer_series_in_order

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]
TRITON_SERVICE = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# Health service names under which each model's readiness is reported, e.g. "models/digits".
MODEL_HEALTH_PREFIX = "models/"


class Settings(ServiceSettings):
    """The orchestrator's settings, from TENSORWAY_ORCHESTRATOR_* variables (lists as JSON)."""

    model_config = SettingsConfigDict(env_prefix="TENSORWAY_ORCHESTRATOR_", extra="ignore")

    tritons: tuple[str, ...] = ("127.0.0.1:8001",)
    """gRPC addresses ("host:port") of the Tritons of this pool; they all serve the same models."""
    pool: str = "default"
    """The pool's id in the registry (the `{pool}` of "pools/{pool}")."""
    registry_address: str | None = None
    """Registry gRPC address; when set, the registry's deployments for the pool decide which
    models are loaded and unloaded. Unset, only `models` are loaded and nothing is unloaded."""
    models: tuple[str, ...] = ()
    """Models to load on every Triton at start (explicit model control), and keep loaded."""
    streams_per_triton: int = 2
    """ModelStreamInfer streams kept open to each Triton; 0 sends every request as a unary
    ModelInfer (for a proxy in front of Triton that cuts long-lived streams)."""
    max_in_flight: int = 256
    """Requests at Triton at once; more wait for a slot."""
    max_queued: int = 1024
    """Requests that may wait for a slot; beyond them requests get RESOURCE_EXHAUSTED."""
    stream_max_in_flight: int = 256
    """Requests of one stream in flight at once (until each one's last answer is sent); past them
    the stream is not read until an answer goes out, so the caller is held back by flow control."""
    default_timeout: timedelta = timedelta(seconds=60)
    """Deadline of a request whose caller set none."""
    hedge_after: timedelta = timedelta(milliseconds=500)
    """A request the chosen Triton has not answered after this long is sent to a second Triton
    of the pool as well and the first answer wins: a stalled Triton then costs a request this
    delay instead of its deadline, at the price of running twice every request slower than it
    (keep it above the slowest model's p99). 0 turns hedging off; requests still move to
    another Triton when theirs fails. A pool of one Triton never hedges."""
    health_interval: timedelta = timedelta(seconds=1)
    """How often the Tritons' readiness and their ready models are polled."""
    control_timeout: timedelta = timedelta(seconds=2)
    """Deadline of readiness, metadata and repository calls to Triton. A stalled Triton holds
    each readiness poll of the pool this long, delaying the news that another came back."""
    load_timeout: timedelta = timedelta(seconds=120)
    """Deadline of loading or unloading one model on one Triton."""
    model_repository: Path | None = None
    """The Tritons' model repository (the directory of their --model-repository), into which
    versions with an s3:// artifact are fetched. Unset, only models already there are served."""
    model_repositories: dict[str, Path] = Field(default_factory=dict)
    """The repository of each Triton (by its address in `tritons`) that does not share
    `model_repository` (a JSON object in the environment)."""
    s3_endpoint: str = "http://127.0.0.1:9000"
    """S3 endpoint URL that artifacts are fetched from."""
    s3_access_key: str = ""
    """S3 access key."""
    s3_secret_key: str = ""
    """S3 secret key."""
    s3_region: str = "us-east-1"
    """S3 region."""
    warmup_timeout: timedelta = timedelta(seconds=30)
    """Deadline of a freshly loaded version's warm-up request."""
    advertise_address: str | None = None
    """This orchestrator's address as routers reach it ("host:port"): it joins its pool under it
    and reports the versions' states under it. Unset, "{host}:{port}", with the machine's fully
    qualified name for a wildcard host. In Kubernetes, the pod IP from the downward API; it must
    lie where the registry lets pool endpoints live (its `pool_endpoint_allow`)."""

    join_pool: bool = True
    """With a registry, join the pool's members under `advertise_address` when serving, renew
    the lease every `pool_heartbeat`, and leave on a graceful stop, so no one lists orchestrators
    by hand. Turn it off for a pool whose endpoints are set by hand."""
    pool_lease: timedelta = timedelta(seconds=10)
    """How long the pool keeps this orchestrator without a heartbeat: if it dies, routers are
    sent to it (their breakers and retries absorbing the failures) for about this long."""
    pool_heartbeat: timedelta = timedelta(seconds=3)
    """How often the lease is renewed: one small registry write each. Keep it well under
    `pool_lease`, so a slow heartbeat or two does not drop a live orchestrator."""

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.pool_heartbeat * 2 > self.pool_lease:
            raise ValueError("pool_heartbeat must be at most half of pool_lease")
        return self


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """tensorway.inference.v1.InferenceService, served to routers."""

    def __init__(self, orchestrator: Orchestrator, stream_max_in_flight: int) -> None:
        self._orchestrator = orchestrator
        self._stream_max_in_flight = stream_max_in_flight

    async def Infer(self, request: pb.InferRequest, context: Any) -> pb.InferResponse:
        return await self._orchestrator.infer(request)

    async def StreamInfer(
        self, request_iterator: AsyncIterator[pb.StreamInferRequest], context: Any
    ) -> AsyncIterator[pb.StreamInferResponse]:
        async for response in self._orchestrator.stream_infer(request_iterator, self._stream_max_in_flight):
            yield response

    async def InferStream(
        self, request: pb.InferStreamRequest, context: Any
    ) -> AsyncIterator[pb.InferStreamResponse]:
        async for response in self._orchestrator.infer_series(request.request):
            yield pb.InferStreamResponse(response=response)

    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: Any
    ) -> pb.GetModelMetadataResponse:
        return await self._orchestrator.model_metadata(request)


class TritonControlServicer(triton_grpc.GRPCInferenceServiceServicer):
    """Triton's `inference.GRPCInferenceService`, served to routers: inference on Triton's own
    messages (ModelInfer, which routers forward as their Triton clients sent it, each message of
    a client's stream as one call; ModelStreamInfer, on which routers send each request of a
    decoupled model and take its series of answers), and what only the pool's Tritons know: a
    model's configuration, its statistics (per Triton, see `triton_control`) and the repository
    index. The other methods are UNIMPLEMENTED."""

    def __init__(
        self, control: TritonControl, pool: TritonPool, orchestrator: Orchestrator, stream_max_in_flight: int
    ) -> None:
        self._control = control
        self._pool = pool
        self._orchestrator = orchestrator
        self._stream_max_in_flight = stream_max_in_flight

    async def ModelInfer(
        self, request: triton.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.ModelInferResponse:
        return await self._orchestrator.infer_triton(request)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[triton.ModelInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[triton.ModelStreamInferResponse]:
        """Every answer to each request, request after request, as Triton answers a stream."""
        async for response in answer_series_in_order(
            request_iterator, self._orchestrator.infer_triton_series, self._stream_max_in_flight
        ):
            yield response

    async def ServerLive(
        self, request: triton.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.ServerLiveResponse:
        return triton.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: triton.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.ServerReadyResponse:
        return triton.ServerReadyResponse(ready=self._pool.ready)

    async def ModelConfig(
        self, request: triton.ModelConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.ModelConfigResponse:
        return await self._control.model_config(request.name, request.version)

    async def ModelStatistics(
        self, request: triton.ModelStatisticsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.ModelStatisticsResponse:
        entries = await self._control.model_statistics(request.name, request.version)
        context.set_trailing_metadata(((TRITONS_METADATA_KEY, ",".join(address for address, _ in entries)),))
        return triton.ModelStatisticsResponse(model_stats=[statistics for _, statistics in entries])

    async def RepositoryIndex(
        self, request: triton.RepositoryIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.RepositoryIndexResponse:
        return index_response(await self._control.repository_index(), request.ready)


class HealthReport:
    """Reports the pool's readiness through gRPC health: the server is NOT_SERVING when no Triton
    is ready, and each model is reported under "models/{model}"."""

    def __init__(self, server: ServiceServer, pool: TritonPool) -> None:
        self._server = server
        self._pool = pool

    async def __call__(self, readiness: Mapping[str, bool], _came_up: Sequence[TritonEndpoint]) -> None:
        # Set on every poll, not only on change: the server reports SERVING when it starts.
        await self._server.set_serving(self._pool.ready)
        for model, ready in readiness.items():
            await self._server.set_serving(ready, MODEL_HEALTH_PREFIX + model)
            metrics.MODEL_READY.labels(model).set(ready)


async def create(
    settings: Settings, deployments: DeploymentSource | None = None
) -> tuple[ServiceServer, int]:
    """Build the orchestrator server and start following its Tritons; the caller starts the server.

    `deployments` replaces the registry as the source of the pool's models (tests, other setups).
    """
    async with contextlib.AsyncExitStack() as stack:
        pool = TritonPool(
            [
                TritonEndpoint(
                    address,
                    streams=settings.streams_per_triton,
                    max_message_bytes=settings.max_message_bytes,
                    control_timeout=settings.control_timeout,
                    load_timeout=settings.load_timeout,
                )
                for address in settings.tritons
            ]
        )
        stack.push_async_callback(pool.close)
        catalog = ModelCatalog(pool)
        orchestrator = Orchestrator(
            pool,
            catalog,
            max_in_flight=settings.max_in_flight,
            max_queued=settings.max_queued,
            default_timeout=settings.default_timeout,
            hedge_after=settings.hedge_after or None,
        )
        if deployments is None and settings.registry_address is not None:
            from tensorway.orchestrator.registry import RegistryDeployments

            deployments = RegistryDeployments(settings.registry_address, settings.pool)
        placement = ModelPlacement(
            pool,
            catalog,
            settings.models,
            deployments,
            repository=model_repositories(settings),
            warmup_timeout=settings.warmup_timeout,
        )
        stack.push_async_callback(placement.close)
        server, port = create_server(
            "orchestrator",
            settings,
            [
                ServiceBinding(
                    pb_grpc.add_InferenceServiceServicer_to_server,
                    InferenceServicer(orchestrator, settings.stream_max_in_flight),
                    SERVICE,
                ),
                ServiceBinding(
                    triton_grpc.add_GRPCInferenceServiceServicer_to_server,
                    # The methods it leaves out answer UNIMPLEMENTED, as tritonclient's servicer does at
                    # run time; its typed stub marks them abstract.
                    TritonControlServicer(  # type: ignore[abstract]
                        TritonControl(pool), pool, orchestrator, settings.stream_max_in_flight
                    ),
                    TRITON_SERVICE,
                ),
            ],
        )
        pool.add_listener(HealthReport(server, pool))
        reports = None
        if settings.registry_address is not None:
            from tensorway.orchestrator.registry import RegistryStateReports, advertised_address

            advertised = settings.advertise_address or advertised_address(settings.host, port)
            reports = RegistryStateReports(settings.registry_address, settings.pool, advertised)
            stack.push_async_callback(reports.close)
            placement.report_to(reports)
        # Owned by the server from here until it stops: cancelled and awaited first when it does.
        background = [
            asyncio.create_task(pool.watch(settings.health_interval), name="triton health"),
            asyncio.create_task(placement.run(), name="model placement"),
        ]
        stack.push_async_callback(_cancel_and_wait, background)
        if settings.registry_address is not None and settings.join_pool:
            from tensorway.orchestrator.registry import PoolMembership

            membership = PoolMembership(
                settings.registry_address,
                settings.pool,
                advertised,
                lease=settings.pool_lease,
                heartbeat=settings.pool_heartbeat,
                on_joined=placement.report_again,
            )
            stack.push_async_callback(membership.close)
            heartbeats: list[asyncio.Task[None]] = []

            async def join() -> None:
                # Once the server listens: routers may be sent here as soon as the pool lists it.
                heartbeats.append(asyncio.create_task(membership.run(), name="pool membership"))

            async def leave() -> None:
                await _cancel_and_wait(heartbeats)
                await membership.leave()

            server.on_start(join)
            server.on_drain(leave)
        # Cleanups run last added first: the background tasks, then what they use, the pool last.
        cleanups = stack.pop_all()
    server.on_stop(cleanups.aclose)
    return server, port


async def _cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
