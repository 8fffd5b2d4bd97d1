"""Power of two choices on outstanding requests and EWMA latency, around breakers."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

from tensorway.router.balancer import LoadStats, pick
from tensorway.router.breaker import BreakerPolicy, CircuitBreaker, Outcome

STAYS_OPEN = BreakerPolicy(consecutive_failures=1, open_for=timedelta(hours=1))


@dataclass
class FakeEndpoint:
    name: str
    load: LoadStats = field(default_factory=LoadStats)
    breaker: CircuitBreaker = field(default_factory=lambda: CircuitBreaker(STAYS_OPEN))


def endpoints(count: int) -> list[FakeEndpoint]:
    return [FakeEndpoint(f"e{i}") for i in range(count)]


def test_the_less_loaded_of_two_wins() -> None:
    busy, idle = endpoints(2)
    busy.load.outstanding = 5
    rng = random.Random(1)
    assert all(pick([busy, idle], rng) is idle for _ in range(100))


def test_latency_weighs_in_once_both_are_measured() -> None:
    slow, fast = endpoints(2)
    for _ in range(20):
        slow.load.started()
        slow.load.finished(0.050)
        fast.load.started()
        fast.load.finished(0.005)
    fast.load.outstanding = 3  # 4 * 5 ms still beats 1 * 50 ms
    assert pick([slow, fast], random.Random(2)) is fast


def test_ewma_follows_recent_latency() -> None:
    stats = LoadStats()
    for latency in [0.1] * 50 + [0.01] * 50:
        stats.started()
        stats.finished(latency)
    assert stats.latency_ewma is not None
    assert abs(stats.latency_ewma - 0.01) < 0.001
    assert stats.outstanding == 0


def test_equal_endpoints_share_the_load() -> None:
    pool = endpoints(4)
    rng = random.Random(3)
    counts = Counter(pick(pool, rng).name for _ in range(4000))  # type: ignore[union-attr]
    assert set(counts) == {"e0", "e1", "e2", "e3"}
    assert min(counts.values()) > 800


def test_open_breakers_are_skipped_and_none_is_returned_when_all_are_open() -> None:
    pool = endpoints(3)
    for endpoint in pool[:2]:
        endpoint.breaker.acquire()
        endpoint.breaker.release(Outcome.FAILURE)
    rng = random.Random(4)
    assert all(pick(pool, rng) is pool[2] for _ in range(50))
    pool[2].breaker.acquire()
    pool[2].breaker.release(Outcome.FAILURE)
    assert pick(pool, rng) is None


def test_a_half_open_endpoint_gets_the_next_call_as_its_probe() -> None:
    clock = [0.0]
    probing = FakeEndpoint(
        "probing", breaker=CircuitBreaker(BreakerPolicy(consecutive_failures=1), clock=lambda: clock[0])
    )
    healthy = FakeEndpoint("healthy")
    probing.breaker.acquire()
    probing.breaker.release(Outcome.FAILURE)
    rng = random.Random(5)
    assert all(pick([probing, healthy], rng) is healthy for _ in range(20))
    clock[0] += 1
    assert pick([probing, healthy], rng) is probing
