"""A circuit breaker per orchestrator endpoint, so a dead or failing one stops getting traffic fast
and gets it back as soon as one probe succeeds."""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta


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
    """Says nothing about the endpoint (the caller's deadline, a shed request, a cancel)."""


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
