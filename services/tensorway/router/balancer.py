"""Choosing an endpoint: power of two choices on outstanding requests weighted by recent latency."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

from tensorway.router.breaker import CircuitBreaker

# Weight of the newest latency sample: about the last ten calls shape the average.
EWMA_ALPHA = 0.2


class LoadStats:
    """An endpoint's outstanding requests and exponentially weighted recent latency."""

    def __init__(self) -> None:
        self.outstanding = 0
        self.latency_ewma: float | None = None

    def started(self) -> None:
        self.outstanding += 1

    def finished(self, latency_seconds: float | None) -> None:
        """A call ended; `latency_seconds` is None when its duration says nothing about the endpoint."""
        self.outstanding -= 1
        if latency_seconds is not None:
            previous = self.latency_ewma
            self.latency_ewma = (
                latency_seconds if previous is None else previous + EWMA_ALPHA * (latency_seconds - previous)
            )


class Balanced(Protocol):
    """What the balancer needs to know about an endpoint."""

    @property
    def load(self) -> LoadStats: ...

    @property
    def breaker(self) -> CircuitBreaker: ...


EndpointT = TypeVar("EndpointT", bound=Balanced)


def _cheaper(a: LoadStats, b: LoadStats) -> bool:
    """Whether `a` is the better choice: expected wait, or queue length until both have latencies."""
    if a.latency_ewma is None or b.latency_ewma is None:
        return a.outstanding <= b.outstanding
    return (a.outstanding + 1) * a.latency_ewma <= (b.outstanding + 1) * b.latency_ewma


def pick(candidates: Sequence[EndpointT], rng: random.Random) -> EndpointT | None:
    """The endpoint for the next call, or None when every breaker refuses.

    A half-open endpoint waiting for its probe comes first, so a recovered endpoint gets its
    traffic back at once instead of whenever two random choices happen to favour it.
    """
    available = [candidate for candidate in candidates if candidate.breaker.available()]
    for candidate in available:
        if candidate.breaker.wants_probe():
            return candidate
    if len(available) <= 1:
        return available[0] if available else None
    first, second = rng.sample(available, 2)
    return first if _cheaper(first.load, second.load) else second
