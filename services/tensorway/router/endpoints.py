"""Orchestrator endpoints: one channel, circuit breaker and load record per address."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from tensorway.router import metrics
from tensorway.router.balancer import LoadStats
from tensorway.router.breaker import BreakerPolicy, BreakerState, CircuitBreaker, Outcome, outcome_of
from tensorway.runtime import Unavailable
from tensorway.runtime.interceptors import downstream_metadata, downstream_timeout
from tensorway.runtime.server import FLOW_CONTROL_OPTIONS, message_size_options

# The router's own default (runtime settings' max_message_bytes): what it accepts from callers.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# A backend DEADLINE_EXCEEDED this close to the caller's own deadline is the caller's: the
# orchestrator's timer, started from the propagated deadline, may fire a little before the router's.
CALLER_DEADLINE_SLACK_SECONDS = 0.05
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason in a failed call's status details; empty when it carries none."""
    for key, value in error.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:
                return ""
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return ""


class Endpoint:
    """One orchestrator: its channel, breaker and load."""

    def __init__(
        self, address: str, breaker: CircuitBreaker, max_message_bytes: int = MAX_MESSAGE_BYTES
    ) -> None:
        self.address = address
        self.breaker = breaker
        self.load = LoadStats()
        self._max_message_bytes = max_message_bytes
        self._channel, self._methods = self._connect()
        self._retired: set[asyncio.Task[None]] = set()
        # Children looked up once: `labels()` takes a lock and hashes the labels on every call.
        self._breaker_open = metrics.BREAKER_OPEN.labels(address)
        self._breaker_trips = metrics.BREAKER_TRIPS.labels(address)
        self._outstanding = metrics.ENDPOINT_OUTSTANDING.labels(address)
        self._calls: dict[grpc.StatusCode, Any] = {}
        self._breaker_open.set(0)
        self._outstanding.set(0)

    def _connect(self) -> tuple[grpc.aio.Channel, dict[str, Any]]:
        # A plain channel, no client interceptor: an intercepted call costs a task of its own, and
        # `infer` passes the request's context and deadline itself. Requests and answers stay
        # serialized (no serializers): the router forwards the bytes it was sent.
        channel = grpc.aio.insecure_channel(
            self.address, options=[*message_size_options(self._max_message_bytes), *FLOW_CONTROL_OPTIONS]
        )
        return channel, {}

    def _method(self, method: str) -> Any:
        call = self._methods.get(method)
        if call is None:
            call = self._methods[method] = self._channel.unary_unary(method)
        return call

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to this orchestrator, for calls besides inference (Triton's control RPCs,
        which neither the breaker nor the load counts)."""
        return self._channel

    async def infer(self, request: bytes, method: str) -> bytes:
        """Run a serialized request on the orchestrator's `method` (tensorway's Infer or Triton's
        ModelInfer) and return the serialized answer, recording the outcome in the breaker and
        the load."""
        probe = self.breaker.state is BreakerState.HALF_OPEN
        if not self.breaker.acquire():
            raise Unavailable(
                f"endpoint {self.address} is open-circuited", retry_after=self.breaker.retry_after()
            )
        if probe:
            self._renew_failed_channel()
        self.load.started()
        self._outstanding.inc()
        started = time.perf_counter()
        outcome, latency, code = Outcome.IGNORED, None, grpc.StatusCode.CANCELLED
        timeout = downstream_timeout()
        try:
            response: bytes = await self._method(method)(
                request, timeout=timeout, metadata=downstream_metadata()
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            outcome = outcome_of(
                code,
                error_reason(error) if code is grpc.StatusCode.INTERNAL else "",
                caller_out_of_time=timeout is not None
                and time.perf_counter() - started >= timeout - CALLER_DEADLINE_SLACK_SECONDS,
            )
            raise
        else:
            outcome, latency, code = Outcome.SUCCESS, time.perf_counter() - started, grpc.StatusCode.OK
            return response
        finally:
            calls = self._calls.get(code)
            if calls is None:
                calls = self._calls[code] = metrics.ENDPOINT_CALLS.labels(self.address, code.name)
            calls.inc()
            self.load.finished(latency)
            trips = self.breaker.trips
            self.breaker.release(outcome)
            if self.breaker.trips != trips:
                self._breaker_trips.inc()
            self._outstanding.dec()
            self._breaker_open.set(0 if self.breaker.available() else 1)

    async def infer_series(self, request: bytes, method: str, *, bidi: bool) -> AsyncIterator[bytes]:
        """Run a serialized request on the orchestrator's streaming `method` and yield each
        serialized answer as it comes: Triton's ModelStreamInfer (`bidi`, the request written
        alone) or tensorway's InferStream. The outcome is recorded in the breaker as `infer`'s."""
        if not self.breaker.acquire():
            raise Unavailable(
                f"endpoint {self.address} is open-circuited", retry_after=self.breaker.retry_after()
            )
        self._outstanding.inc()
        outcome = Outcome.IGNORED
        options: dict[str, Any] = {"timeout": downstream_timeout(), "metadata": downstream_metadata()}
        multicallable: Any = (
            self._channel.stream_stream(method) if bidi else self._channel.unary_stream(method)
        )
        call = multicallable(iter((request,)) if bidi else request, **options)
        try:
            async for response in call:
                yield response
            outcome = Outcome.SUCCESS
        except grpc.aio.AioRpcError as error:
            code = error.code()
            outcome = outcome_of(code, error_reason(error) if code is grpc.StatusCode.INTERNAL else "")
            raise
        finally:
            call.cancel()  # the caller went away before the last answer: so does the call
            self.breaker.release(outcome)
            self._outstanding.dec()
            self._breaker_open.set(0 if self.breaker.available() else 1)

    def _renew_failed_channel(self) -> None:
        """Give a probe a fresh channel when the current one is failing.

        A failing channel waits out gRPC's reconnect backoff (growing to two minutes) and fails
        calls at once meanwhile, so probes through it would miss an orchestrator that is back; a
        fresh channel connects on its first call.
        """
        if self._channel.get_state() is not grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return
        failed = self._channel
        self._channel, self._methods = self._connect()
        task = asyncio.create_task(failed.close())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def close(self, grace: timedelta) -> None:
        await asyncio.gather(self._channel.close(grace.total_seconds()), *self._retired)


class EndpointSet:
    """The endpoints of the current route table, created on first use and closed when unrouted."""

    def __init__(
        self,
        breaker_policy: BreakerPolicy,
        close_grace: timedelta = timedelta(seconds=30),
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._breaker_policy = breaker_policy
        self._max_message_bytes = max_message_bytes
        self._close_grace = close_grace
        self._endpoints: dict[str, Endpoint] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # The addresses the current route table uses, once one has been retained.
        self._routed: set[str] | None = None

    def get(self, address: str) -> Endpoint:
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            endpoint = self._endpoints[address] = Endpoint(
                address, CircuitBreaker(self._breaker_policy), self._max_message_bytes
            )
        return endpoint

    def of(self, addresses: Iterable[str]) -> list[Endpoint]:
        """The endpoints of `addresses` that the current table still routes to: a request
        resolved on an older table must not bring back one that was dropped (it would stay, with
        its channel, until the next table). All of them when the table routes to none."""
        addresses = list(addresses)
        routed = self._routed
        if routed is not None:
            current = [address for address in addresses if address in routed]
            addresses = current or addresses
        return [self.get(address) for address in addresses]

    def retain(self, addresses: set[str]) -> None:
        """Drop endpoints no route uses any more; their calls in flight get `close_grace` to finish."""
        self._routed = set(addresses)
        for address in [address for address in self._endpoints if address not in addresses]:
            endpoint = self._endpoints.pop(address)
            task = asyncio.create_task(endpoint.close(self._close_grace))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            # Another router in the same process (tests) may have removed the series already.
            with contextlib.suppress(KeyError):
                metrics.BREAKER_OPEN.remove(address)
                metrics.BREAKER_TRIPS.remove(address)
                metrics.ENDPOINT_OUTSTANDING.remove(address)

    async def close(self) -> None:
        """Close every channel now. Safe to call twice."""
        endpoints, self._endpoints = list(self._endpoints.values()), {}
        await asyncio.gather(*(endpoint.close(timedelta(0)) for endpoint in endpoints), *self._closing)
