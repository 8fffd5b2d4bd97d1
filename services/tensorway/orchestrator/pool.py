"""The Tritons beside this orchestrator: how to reach each one, what each has ready, and which
one takes the next request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from datetime import timedelta
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_grpc

from tensorway.common.v1 import error_pb2
from tensorway.orchestrator import metrics
from tensorway.orchestrator.streams import InferStream, UnaryInfer
from tensorway.orchestrator.triton_errors import ModelGone, from_rpc_error
from tensorway.runtime import Unavailable, create_channel, tracing
from tensorway.runtime.server import FLOW_CONTROL_OPTIONS, message_size_options

logger = logging.getLogger(__name__)


# A Triton that restarts is back in the pool within a second of answering again, rather than
# after gRPC's reconnect backoff, which grows to two minutes: it sits beside the orchestrator,
# so trying it often costs nothing.
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000))
# Both channels to a Triton take the same arguments, so gRPC lets them share one connection.
_CHANNEL_OPTIONS = (*RECONNECT_OPTIONS, *FLOW_CONTROL_OPTIONS)


class TritonEndpoint:
    """One Triton: its channel, the streams (or unary calls) requests travel on, and its readiness.

    Readiness is what the last `refresh()` saw; before the first one the Triton counts as ready,
    so requests are not refused while the first check is on its way.
    """

    def __init__(
        self,
        address: str,
        *,
        streams: int,
        max_message_bytes: int,
        control_timeout: timedelta,
        load_timeout: timedelta,
    ) -> None:
        self.address = address
        self.ready = True
        self.ready_models: frozenset[str] | None = None
        self._channel = create_channel(address, max_message_bytes, _CHANNEL_OPTIONS)
        self._stub = triton_grpc.GRPCInferenceServiceStub(self._channel)
        # Streams carry no request's context, and a client interceptor on a stream call costs
        # an extra queue hop per message: streams get a channel of their own, without one.
        self._stream_channel = grpc.aio.insecure_channel(
            address,
            options=[*message_size_options(max_message_bytes), *_CHANNEL_OPTIONS],
        )
        stream_stub = triton_grpc.GRPCInferenceServiceStub(self._stream_channel)
        self._senders: Sequence[InferStream | UnaryInfer] = [
            InferStream(stream_stub, address) for _ in range(streams)
        ] or [UnaryInfer(self._stub)]
        # Triton joins a trace only from a call's own metadata, which a shared stream cannot
        # carry per request: a sampled request goes unary, with its traceparent.
        self._traced = UnaryInfer(self._stub)
        self._control_timeout = control_timeout.total_seconds()
        self._load_timeout = load_timeout.total_seconds()

    @property
    def pending(self) -> int:
        """Requests sent to this Triton and not yet answered."""
        return self._traced.pending + sum(sender.pending for sender in self._senders)

    def serves(self, model: str) -> bool:
        return self.ready and (self.ready_models is None or model in self.ready_models)

    def mark_down(self) -> None:
        """A request found this Triton unreachable: send it nothing until the next `refresh()`
        sees it live again."""
        self.ready = False
        metrics.TRITON_READY.labels(self.address).set(False)

    def mark_failed(self, model: str, failure: Unavailable) -> None:
        """A request for `model` failed here as UNAVAILABLE: the model is gone from this Triton
        (`ModelGone`), or the Triton itself is away."""
        if isinstance(failure, ModelGone):
            self.mark_model_gone(model)
        else:
            self.mark_down()

    def mark_model_gone(self, model: str) -> None:
        """This Triton answered that it does not serve `model`: send it none until the next
        `refresh()` finds the model ready again."""
        if self.ready_models is not None:
            self.ready_models = self.ready_models - {model}

    async def infer(self, request: Any) -> Any:
        """Run a Triton ModelInferRequest on the least busy stream, or as a unary call of its own
        when its trace is sampled, so that Triton's spans join the trace."""
        if tracing.sampled():
            return await self._traced.infer(request)
        sender = min(self._senders, key=lambda candidate: candidate.pending)
        return await sender.infer(request)

    def infer_series(self, request: Any) -> AsyncIterator[Any]:
        """Run a request of a decoupled model on the least busy stream: Triton's stream answers to
        it as they come, through the final one."""
        sender = min(self._senders, key=lambda candidate: candidate.pending)
        return sender.infer_series(request)

    async def refresh(self) -> None:
        """Ask Triton whether it is live and which models it has ready.

        Not ServerReady: with strict readiness, Triton reports itself not ready while any model
        it knows is unloaded, which explicit model control does on purpose.
        """
        try:
            server = await self._stub.ServerLive(triton.ServerLiveRequest(), timeout=self._control_timeout)
            index = await self._stub.RepositoryIndex(
                triton.RepositoryIndexRequest(ready=True), timeout=self._control_timeout
            )
        except grpc.aio.AioRpcError as error:
            if self.ready:
                logger.warning("Triton %s is not ready: %s", self.address, error.details())
            self.ready, self.ready_models = False, frozenset()
        else:
            self.ready = bool(server.live)
            self.ready_models = frozenset(model.name for model in index.models)
        metrics.TRITON_READY.labels(self.address).set(self.ready)

    async def signature_sources(self, model: str, version: str) -> tuple[Any, Any]:
        """Triton's ModelMetadataResponse and ModelConfig of a model version."""
        try:
            metadata = await self._stub.ModelMetadata(
                triton.ModelMetadataRequest(name=model, version=version), timeout=self._control_timeout
            )
            config = await self._stub.ModelConfig(
                triton.ModelConfigRequest(name=model, version=version), timeout=self._control_timeout
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, model) from error
        return metadata, config.config

    async def model_config(self, model: str, version: str) -> Any:
        """Triton's own ModelConfigResponse for a model version; a failure is Triton's AioRpcError."""
        return await self._stub.ModelConfig(
            triton.ModelConfigRequest(name=model, version=version), timeout=self._control_timeout
        )

    async def model_statistics(self, model: str, version: str) -> Any:
        """Triton's own ModelStatisticsResponse ("" for every model or version); a failure is
        Triton's AioRpcError."""
        return await self._stub.ModelStatistics(
            triton.ModelStatisticsRequest(name=model, version=version), timeout=self._control_timeout
        )

    async def repository_index(self) -> Any:
        """Triton's own RepositoryIndexResponse, loaded models or not, with their states and
        reasons; a failure is Triton's AioRpcError."""
        return await self._stub.RepositoryIndex(
            triton.RepositoryIndexRequest(ready=False), timeout=self._control_timeout
        )

    async def known_models(self) -> frozenset[str]:
        """Every model in the Triton's repository, loaded or not."""
        try:
            index = await self._stub.RepositoryIndex(
                triton.RepositoryIndexRequest(ready=False), timeout=self._control_timeout
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "") from error
        return frozenset(model.name for model in index.models)

    async def load(self, model: str) -> None:
        """Load (or reload) a model with explicit model control."""
        try:
            await self._stub.RepositoryModelLoad(
                triton.RepositoryModelLoadRequest(model_name=model), timeout=self._load_timeout
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, model) from error

    async def unload(self, model: str) -> None:
        """Unload a model; Triton lets the requests it has finish first."""
        try:
            await self._stub.RepositoryModelUnload(
                triton.RepositoryModelUnloadRequest(model_name=model), timeout=self._load_timeout
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, model) from error

    async def close(self) -> None:
        for sender in self._senders:
            if isinstance(sender, InferStream):
                await sender.close()
        await self._stream_channel.close()
        await self._channel.close()


ReadinessListener = Callable[[Mapping[str, bool], Sequence[TritonEndpoint]], Awaitable[None]]


class TritonPool:
    """The Tritons of one pool, all serving the same models.

    `refresh()` polls them; listeners hear each model's readiness (ready on at least one Triton)
    and which Tritons have just become ready, e.g. to load the pool's models on a restarted one.
    """

    def __init__(self, endpoints: Sequence[TritonEndpoint]) -> None:
        if not endpoints:
            raise ValueError("a pool needs at least one Triton")
        self.endpoints = list(endpoints)
        self._listeners: list[ReadinessListener] = []
        self._models_seen: set[str] = set()

    @property
    def ready(self) -> bool:
        """Whether at least one Triton is ready."""
        return any(endpoint.ready for endpoint in self.endpoints)

    def add_listener(self, listener: ReadinessListener) -> None:
        self._listeners.append(listener)

    def choose(self, model: str, exclude: Collection[str] = ()) -> TritonEndpoint:
        """The least busy Triton not in `exclude` (addresses) that has the model ready; any least
        busy one not in `exclude` when none has. Unavailable when every Triton is excluded."""
        left = [endpoint for endpoint in self.endpoints if endpoint.address not in exclude]
        if not left:
            raise Unavailable(
                f"no other Triton of the pool can take model {model!r}",
                reason=error_pb2.ERROR_REASON_MODEL_NOT_READY,
                metadata={"model": model},
            )
        candidates = [endpoint for endpoint in left if endpoint.serves(model)] or left
        return min(candidates, key=lambda endpoint: endpoint.pending)

    async def refresh(self, endpoints: Sequence[TritonEndpoint] | None = None) -> None:
        """Poll the Tritons (all, or the given ones) and tell the listeners."""
        polled = self.endpoints if endpoints is None else endpoints
        was_ready = {endpoint.address: endpoint.ready for endpoint in polled}
        await asyncio.gather(*(endpoint.refresh() for endpoint in polled))
        came_up = [e for e in polled if e.ready and not was_ready[e.address]]
        ready_models = {m for e in self.endpoints if e.ready for m in e.ready_models or ()}
        self._models_seen |= ready_models
        readiness = {model: model in ready_models for model in self._models_seen}
        for listener in self._listeners:
            await listener(readiness, came_up)

    async def watch(self, interval: timedelta) -> None:
        """Refresh every `interval`, forever."""
        while True:
            await self.refresh()
            await asyncio.sleep(interval.total_seconds())

    async def close(self) -> None:
        await asyncio.gather(*(endpoint.close() for endpoint in self.endpoints))
