"""A circuit breaker per orchestrator endpoint, so a dead or failing one stops getting traffic fast
and gets it back as soon as one probe succeeds; and which answers count against an endpoint.

Only server faults count: a tenant sending malformed requests must not eject an endpoint that
serves every other tenant and model of its pool.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import grpc


class BreakerState(enum.Enum):
    """Where a breaker is in its cycle."""

    CLOSED = "closed"
    """Traffic flows; outcomes are counted."""
    OPEN = "open"
    """No traffic until the open period ends."""
    HALF_OPEN = "half_open"
    """One probe request at a time decides whether to close again or reopen."""


class Outcome(enum.Enum):
    """What a call said about the endpoint's health."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"
    """Says nothing about the endpoint (a client error, the caller's deadline, a shed request, a
    cancel, a model's own error answer)."""


# The endpoint answered and the fault is the request's or the caller's. They are IGNORED rather
# than SUCCESS: the orchestrator refuses most of them itself, before any Triton sees the request,
# so they prove nothing about its Tritons; and counted as successes, a flood of one tenant's bad
# requests would dilute the failure rate of an endpoint that fails everyone else's.
CLIENT_FAULTS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
# Say nothing about the endpoint: a cancel, or a deliberate shed (the endpoint is busy, not broken;
# the request is retried elsewhere and slowness shows in the latency instead).
NEUTRAL = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED})
# The ErrorInfo reason of a model's own error answer (the orchestrator's BACKEND_ERROR): Triton
# answered, so the endpoint is up, and whether the request or the model is at fault cannot be
# told; a model that fails every request fails on every endpoint alike, so ejecting one would only
# take the other models of its pool down with it. Triton faults that another Triton may not share
# (a dead model process, an unreachable Triton) reach the router as UNAVAILABLE and do count.
MODEL_ERROR_REASON = "BACKEND_ERROR"


def outcome_of(code: grpc.StatusCode, reason: str = "", *, caller_out_of_time: bool = False) -> Outcome:
    """What a call's status says about the endpoint's health.

    Server faults are FAILURE: UNAVAILABLE (down, unreachable, connection lost), INTERNAL and
    UNKNOWN other than a model's own error answer, DEADLINE_EXCEEDED while the caller still had
    time (the endpoint gave up or stalled), UNIMPLEMENTED and DATA_LOSS. `reason` is the
    ErrorInfo reason of the status, if any; `caller_out_of_time` says the caller's own deadline
    ran out, which is then what DEADLINE_EXCEEDED means.
    """
    if code is grpc.StatusCode.OK:
        return Outcome.SUCCESS
    if code in CLIENT_FAULTS or code in NEUTRAL:
        return Outcome.IGNORED
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        # A short client deadline must not open breakers for everyone.
        return Outcome.IGNORED if caller_out_of_time else Outcome.FAILURE
    if code is grpc.StatusCode.INTERNAL and reason == MODEL_ERROR_REASON:
        return Outcome.IGNORED
    return Outcome.FAILURE


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker opens and for how long."""

    consecutive_failures: int = 5
    """Open after this many failures in a row."""
    failure_rate: float = 0.5
    """Open when at least this share of the last `window` calls failed..."""
    window: int = 20
    """...counted over this many recent calls (and only once that many were seen)."""
    open_for: timedelta = timedelta(seconds=1)
    """How long an open breaker refuses traffic before it lets one probe through."""


class CircuitBreaker:
    """closed → open (consecutive failures or failure rate) → half-open probe → closed or open again.

    Single-threaded by design: the router calls it from its event loop only. `acquire()` before a
    call, then exactly one `release(outcome)` after it.
    """

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._recent: deque[bool] = deque(maxlen=policy.window)
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.trips = 0
        """How often the breaker has opened: a trip between two scrapes leaves no trace on a gauge."""

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._open_seconds:
            self._state = BreakerState.HALF_OPEN
        return self._state

    @property
    def _open_seconds(self) -> float:
        return self._policy.open_for.total_seconds()

    def available(self) -> bool:
        """Whether `acquire()` would let a call through now."""
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._probe_in_flight)

    def wants_probe(self) -> bool:
        """Half-open with no probe out: the balancer should send the next call here."""
        return self.state is BreakerState.HALF_OPEN and not self._probe_in_flight

    def retry_after(self) -> timedelta:
        """How long until an open breaker lets a probe through."""
        if self.state is not BreakerState.OPEN:
            return timedelta(0)
        return timedelta(seconds=max(0.0, self._opened_at + self._open_seconds - self._clock()))

    def acquire(self) -> bool:
        """Claim the right to make one call; False when the breaker refuses it."""
        if not self.available():
            return False
        if self._state is BreakerState.HALF_OPEN:
            self._probe_in_flight = True
        return True

    def release(self, outcome: Outcome) -> None:
        """Report how the call acquired before went."""
        if self._state is BreakerState.HALF_OPEN and self._probe_in_flight:
            self._probe_in_flight = False
            if outcome is Outcome.SUCCESS:
                self._close()
            elif outcome is Outcome.FAILURE:
                self._open()
            return
        if self._state is not BreakerState.CLOSED or outcome is Outcome.IGNORED:
            # Late answers from calls made before the breaker opened say nothing new.
            return
        failed = outcome is Outcome.FAILURE
        self._recent.append(failed)
        self._consecutive_failures = self._consecutive_failures + 1 if failed else 0
        if self._consecutive_failures >= self._policy.consecutive_failures or self._rate_exceeded():
            self._open()

    def _rate_exceeded(self) -> bool:
        if len(self._recent) < self._policy.window:
            return False
        return sum(self._recent) / len(self._recent) >= self._policy.failure_rate

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self.trips += 1

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._recent.clear()
        self._consecutive_failures = 0
