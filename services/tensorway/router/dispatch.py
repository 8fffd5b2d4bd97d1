"""The router's core: model → version → pool → endpoint, with breakers, retries, shedding and shadows.

Both public APIs (tensorway's InferenceService and Triton's GRPCInferenceService) hand their
requests to `Router.infer` as the serialized messages they arrived as (an `InferRequest` or a
`ModelInferRequest`), which go to the orchestrator method that takes the same message;
everything that decides where a request goes and what happens when it fails lives here.
Requests and answers cross the router as the bytes they arrived as: routing reads only the
model and version from the wire (fields 1 and 2 in both APIs), so tensors are never parsed or
serialized again on their way through.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status
from opentelemetry import trace

from tensorway.common.v1 import error_pb2
from tensorway.orchestrator.triton_errors import sequence_lost
from tensorway.ratelimit.leases import QuotaLeases
from tensorway.router import metrics
from tensorway.router.balancer import pick
from tensorway.router.breaker import BreakerPolicy
from tensorway.router.endpoints import MAX_MESSAGE_BYTES, Endpoint, EndpointSet
from tensorway.router.retry import RetryBudget, RetryPolicy
from tensorway.router.routing import ModelRoute, RouteTable, RouteWatcher, VersionRoute
from tensorway.router.sequences import SequenceKey, SequencePins, key_of
from tensorway.router.serialized import SerializedRequest
from tensorway.router.shadow import MismatchSamples, ShadowMirror
from tensorway.runtime import ResourceExhausted, Unavailable
from tensorway.runtime.context import caller
from tensorway.runtime.errors import GENERIC_INTERNAL_MESSAGE, RETRYABLE_CODES, Internal, TensorwayError
from tensorway.tensors.triton import SequenceStep

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterPolicy:
    """How much the router takes on and how it treats failing endpoints."""

    max_concurrency: int = 2048
    """Requests in flight past which new ones are shed with RESOURCE_EXHAUSTED."""
    shed_retry_after: timedelta = timedelta(milliseconds=100)
    """The delay a shed request's RetryInfo suggests."""
    shadow_max_in_flight: int = 256
    """Shadow calls in flight past which new copies are dropped (and counted)."""
    shadow_mismatch_samples: int = 10
    """Mismatching shadow answers of each model version logged in full per minute."""
    max_sequences: int = 65536
    """Live sequences whose endpoint the router remembers (least recently used ones go first)."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    """The largest message sent to or taken from an orchestrator, as the router takes from callers."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)


class Router:
    """Routes inference requests over the route table the watcher keeps current."""

    def __init__(
        self,
        routes: RouteWatcher,
        policy: RouterPolicy,
        rng: random.Random | None = None,
        *,
        limits: QuotaLeases | None = None,
    ) -> None:
        """`limits` counts every request against the caller's tenant's and the model's global
        limits; None serves without them."""
        self._routes = routes
        self._limits = limits
        self._policy = policy
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not crypto
        self.endpoints = EndpointSet(policy.breaker, max_message_bytes=policy.max_message_bytes)
        self._budget = RetryBudget(policy.retry)
        self._shadow = ShadowMirror(
            self._shadow_call,
            policy.shadow_max_in_flight,
            self._rng,
            MismatchSamples(policy.shadow_mismatch_samples, timedelta(minutes=1)),
        )
        self._in_flight = 0
        self._sequences = SequencePins(policy.max_sequences)
        # Metric children of each (model, version), looked up once: `labels()` takes a lock and
        # hashes its labels on every call. Bounded by the routes; dropped with each new table.
        self._children: dict[tuple[str, str], _VersionMetrics] = {}
        routes.add_listener(self._on_table)

    @property
    def table(self) -> RouteTable:
        """The route table in service; UNAVAILABLE until the registry sent the first one."""
        table = self._routes.table
        if table is None:
            raise Unavailable("the route table has not been loaded from the registry yet")
        return table

    @property
    def loaded(self) -> bool:
        """Whether the first route table has arrived."""
        return self._routes.table is not None

    def serviceable(self, version: VersionRoute) -> bool:
        """Whether some endpoint of the version's pool would take a request now."""
        return any(endpoint.breaker.available() for endpoint in self.endpoints.of(version.endpoints))

    def resolve(
        self, model: str, version: str, route_key: str | None = None
    ) -> tuple[ModelRoute, VersionRoute]:
        """The model's route and the version a request for (`model`, `version`) would run."""
        route = self.table.model(model)
        return route, route.choose(version, route_key, self._rng)

    def describe(self, model: str, version: str) -> tuple[ModelRoute, VersionRoute]:
        """The model's route and the version metadata calls describe: the one named, or the default."""
        route = self.table.model(model)
        return route, route.choose(version, None, self._rng) if version else route.default()

    async def infer(self, request: SerializedRequest, route_key: str | None = None) -> bytes:
        """Run `request` on the version and endpoint the route table and endpoint health choose;
        returns the serialized answer (an InferResponse, or Triton's ModelInferResponse).

        Retryable failures (UNAVAILABLE, RESOURCE_EXHAUSTED) go to another endpoint of the pool
        while attempts and the retry budget last. `route_key` pins default traffic to one version.
        Past a global limit of the caller's tenant or the model it is RESOURCE_EXHAUSTED.
        A request of a stateful sequence (`request.sequence`) runs on the endpoint its sequence
        started on; only a sequence's START may move to another endpoint.
        """
        self._shed_when_full()
        self._in_flight += 1
        arrived = time.perf_counter()
        try:
            route, version = await self._admitted(request, route_key)
            primary_answer = self._shadow.mirror(route, version, request)
            try:
                response = await self._call_with_retries(
                    route.model, version, request.with_version(version.version), arrived
                )
            except BaseException:
                if primary_answer is not None:
                    primary_answer.set_result(None)
                raise
            if primary_answer is not None:
                primary_answer.set_result(response)
            return response
        finally:
            self._in_flight -= 1

    async def infer_series(
        self,
        request: SerializedRequest,
        route_key: str | None,
        method: str,
        *,
        bidi: bool,
        framed: Callable[[bytes], bytes] = lambda data: data,
    ) -> AsyncIterator[bytes]:
        """Run `request` on the orchestrator's streaming `method` (for a decoupled model's series
        of answers), as the message `framed` makes of its bytes, and yield each serialized answer
        as it comes, chosen, limited and shed as `infer` does. A retryable failure goes to another
        endpoint only before the first answer: after it, the client has part of the series. Not
        mirrored to shadows."""
        self._shed_when_full()
        self._in_flight += 1
        try:
            route, version = await self._admitted(request, route_key)
            data = framed(request.for_version(version.version))
            tried: set[str] = set()
            while True:
                endpoint = self._choose_endpoint(version, tried)
                tried.add(endpoint.address)
                answered = False
                try:
                    async for response in endpoint.infer_series(data, method, bidi=bidi):
                        answered = True
                        yield response
                    return
                except grpc.aio.AioRpcError as error:
                    if answered or not self._may_retry(route.model, version, error.code(), tried):
                        raise
                    metrics.RETRIES.labels(route.model, error.code().name).inc()
        finally:
            self._in_flight -= 1

    def _shed_when_full(self) -> None:
        if self._in_flight >= self._policy.max_concurrency:
            metrics.SHED.inc()
            raise ResourceExhausted(
                f"the router is at its limit of {self._policy.max_concurrency} requests in flight",
                retry_after=self._policy.shed_retry_after,
            )

    async def _admitted(
        self, request: SerializedRequest, route_key: str | None
    ) -> tuple[ModelRoute, VersionRoute]:
        """The route and version `request` runs on, once the global limits admit it."""
        route, version = self.resolve(request.model, request.version, route_key)
        if self._limits is not None:
            # Every inference of both APIs, unary or a stream's message, passes here once; a
            # model that does not exist is refused before it could make counters in Redis.
            await self._limits.admit(
                caller().tenant, route.model, request.data, inputs_field=request.api.inputs_field
            )
        return route, version

    async def _call_with_retries(
        self,
        model: str,
        version: VersionRoute,
        request: SerializedRequest,
        arrived: float,
    ) -> bytes:
        self._budget.record_request()
        step, method, data = request.sequence, request.api.method, request.data
        children = self._metrics_of(model, version.version)
        children.request_bytes.inc(len(data))
        # The routing decision on the request's server span: which version and endpoint ran it.
        span = trace.get_current_span()
        recording = span.is_recording()
        if recording:
            span.set_attribute("tensorway.route.version", version.version)
            span.set_attribute("tensorway.route.pool", version.pool)
        tried: set[str] = set()
        code = grpc.StatusCode.UNAVAILABLE
        sequence = None if step is None else key_of(model, version.version, step)
        try:
            while True:
                if sequence is None or step is None:
                    endpoint = self._choose_endpoint(version, tried)
                else:
                    endpoint = self._sequence_endpoint(version, sequence, step, tried)
                tried.add(endpoint.address)
                if recording:
                    span.set_attribute("tensorway.route.endpoint", endpoint.address)
                    span.set_attribute("tensorway.route.attempts", len(tried))
                try:
                    response = await endpoint.infer(data, method)
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                    if step is not None and not step.start:
                        if code in RETRYABLE_CODES:
                            why = error.details() or code.name
                            raise sequence_lost(model, step, "endpoint", why) from error
                        raise
                    if not self._may_retry(model, version, code, tried):
                        raise
                    metrics.RETRIES.labels(model, code.name).inc()
                    continue
                code = grpc.StatusCode.OK
                children.response_bytes.inc(len(response))
                return response
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if (
                sequence is not None
                and step is not None
                and (step.end or (step.start and code != grpc.StatusCode.OK))
            ):
                # Ended, or never started: a new START picks its endpoint afresh.
                self._sequences.unpin(sequence)
            routed, seconds = children.by_code(code)
            routed.inc()
            seconds.observe(time.perf_counter() - arrived)

    def _choose_endpoint(self, version: VersionRoute, tried: set[str]) -> Endpoint:
        candidates = [
            endpoint for endpoint in self.endpoints.of(version.endpoints) if endpoint.address not in tried
        ]
        endpoint = pick(candidates, self._rng)
        if endpoint is None:
            retry_after = min(
                (candidate.breaker.retry_after() for candidate in candidates), default=timedelta(seconds=1)
            )
            raise Unavailable(
                f"no healthy endpoint serves version {version.version!r} (pool {version.pool})",
                retry_after=retry_after,
                reason=error_pb2.ERROR_REASON_MODEL_NOT_READY,
            )
        return endpoint

    def _sequence_endpoint(
        self, version: VersionRoute, sequence: SequenceKey, step: SequenceStep, tried: set[str]
    ) -> Endpoint:
        """The endpoint a sequence runs on: for its START, the first available one in the
        sequence's rendezvous order (so routers agree without talking), pinned from then on; for
        its later requests, the pinned one, else the first in that order."""
        if not step.start:
            pinned = self._sequences.get(sequence)
            if pinned is None:
                ranked = _rendezvous(version.endpoints, sequence)
                if not ranked:
                    return self._choose_endpoint(version, tried)  # raises: the pool is empty
                pinned = ranked[0]
            if pinned not in version.endpoints:
                raise sequence_lost(sequence[0], step, "endpoint", "its endpoint left the pool")
            endpoint = self.endpoints.get(pinned)
            if not endpoint.breaker.available():
                raise sequence_lost(sequence[0], step, "endpoint", f"endpoint {pinned} is unavailable")
            return endpoint
        for address in _rendezvous(version.endpoints, sequence):
            endpoint = self.endpoints.get(address)
            if address not in tried and endpoint.breaker.available():
                self._sequences.pin(sequence, address)
                return endpoint
        return self._choose_endpoint(version, set(version.endpoints))  # raises: none is available

    def _may_retry(self, model: str, version: VersionRoute, code: grpc.StatusCode, tried: set[str]) -> bool:
        """Retry only retryable codes, on an endpoint not tried yet, within attempts and budget."""
        if (
            code not in RETRYABLE_CODES
            or len(tried) >= self._policy.retry.max_attempts
            or not any(
                self.endpoints.get(address).breaker.available() for address in set(version.endpoints) - tried
            )
        ):
            return False
        if not self._budget.try_spend():
            metrics.RETRIES_DENIED.labels(model).inc()
            return False
        return True

    async def _shadow_call(self, version: VersionRoute, request: bytes, method: str) -> bytes:
        # One attempt, no retry: a shadow must not spend the budget the primary traffic needs.
        endpoint = pick(self.endpoints.of(version.endpoints), self._rng)
        if endpoint is None:
            raise Unavailable(f"no healthy endpoint serves shadow version {version.version!r}")
        return await endpoint.infer(request, method)

    def _metrics_of(self, model: str, version: str) -> _VersionMetrics:
        children = self._children.get((model, version))
        if children is None:
            children = self._children[(model, version)] = _VersionMetrics(model, version)
        return children

    def _on_table(self, table: RouteTable) -> None:
        self.endpoints.retain(table.endpoints())
        self._children = {}

    async def close(self) -> None:
        """Stop shadows and close every endpoint channel. Safe to call twice."""
        await self._shadow.close()
        await self.endpoints.close()


class _VersionMetrics:
    """The metric children of one model version."""

    __slots__ = ("_codes", "_model", "_version", "request_bytes", "response_bytes")

    def __init__(self, model: str, version: str) -> None:
        self._model, self._version = model, version
        self.request_bytes = metrics.REQUEST_BYTES.labels(model, version)
        self.response_bytes = metrics.RESPONSE_BYTES.labels(model, version)
        self._codes: dict[grpc.StatusCode, tuple[Any, Any]] = {}

    def by_code(self, code: grpc.StatusCode) -> tuple[Any, Any]:
        """(ROUTED, REQUEST_SECONDS) children for answers with `code`."""
        children = self._codes.get(code)
        if children is None:
            children = self._codes[code] = (
                metrics.ROUTED.labels(self._model, self._version, code.name),
                metrics.REQUEST_SECONDS.labels(self._model, self._version, code.name),
            )
        return children


def _rendezvous(addresses: Iterable[str], sequence: SequenceKey) -> list[str]:
    """`addresses` in the sequence's own order (highest random weight first): stable for a
    sequence across routers and restarts, and spread evenly over sequences."""
    name = "\0".join(sequence).encode()
    return sorted(
        set(addresses),
        key=lambda address: hashlib.blake2b(name + b"\0" + address.encode(), digest_size=8).digest(),
        reverse=True,
    )


def status_of(error: BaseException) -> Any:
    """The google.rpc.Status a unary call would have failed with, for a failed request of a
    stream, which answers with it instead of ending the stream."""
    if isinstance(error, TensorwayError):
        return error.to_status_proto()
    if isinstance(error, grpc.aio.AioRpcError):
        # A downstream tensorway service's status, with its details, passes through as it is.
        downstream = rpc_status.from_call(error)
        if downstream is not None:
            return downstream
        return status_pb2.Status(code=error.code().value[0], message=error.details() or "")
    logger.error("unhandled error in a stream", exc_info=error)
    return Internal(GENERIC_INTERNAL_MESSAGE).to_status_proto()
