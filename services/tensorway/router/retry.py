"""How often the router retries (the codes it retries are runtime.errors.RETRYABLE_CODES), and the
budget that keeps retries from multiplying an outage."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts one request gets and how many retries the router allows overall."""

    max_attempts: int = 3
    """Attempts per request, the first included; each retry goes to another endpoint."""
    budget_ratio: float = 0.2
    """Retries allowed as a share of requests over the window..."""
    budget_min_per_second: float = 10.0
    """...plus this many per second, so a quiet router can still retry."""
    budget_window: timedelta = timedelta(seconds=10)
    """The window requests and retries are counted over."""


class RetryBudget:
    """Retries may add at most `ratio` of the request rate (plus a small floor) over a sliding window.

    Counted in one-second buckets, so the cost per request is O(1) and memory is O(window).
    """

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._ratio = policy.budget_ratio
        self._buckets = max(1, math.ceil(policy.budget_window.total_seconds()))
        self._floor = policy.budget_min_per_second * self._buckets
        self._clock = clock
        self._requests = [0] * self._buckets
        self._retries = [0] * self._buckets
        self._second = math.floor(clock())

    def record_request(self) -> None:
        """Count one first attempt."""
        self._requests[self._bucket()] += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        bucket = self._bucket()
        if sum(self._retries) >= self._floor + self._ratio * sum(self._requests):
            return False
        self._retries[bucket] += 1
        return True

    def _bucket(self) -> int:
        """The current second's bucket, clearing the buckets of seconds that have passed."""
        now = math.floor(self._clock())
        for second in range(max(self._second + 1, now - self._buckets + 1), now + 1):
            index = second % self._buckets
            self._requests[index] = 0
            self._retries[index] = 0
        self._second = max(self._second, now)
        return now % self._buckets
