"""RetryBudget: retries limited to a share of requests plus a floor, over a sliding window."""

from __future__ import annotations

from datetime import timedelta

from tensorway.router.retry import RetryBudget, RetryPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budget(clock: Clock, ratio: float = 0.2, floor: float = 1.0) -> RetryBudget:
    policy = RetryPolicy(budget_ratio=ratio, budget_min_per_second=floor, budget_window=timedelta(seconds=10))
    return RetryBudget(policy, clock=clock)


def spend_all(retries: RetryBudget) -> int:
    spent = 0
    while retries.try_spend():
        spent += 1
    return spent


def test_a_quiet_router_still_gets_the_floor() -> None:
    clock = Clock()
    assert spend_all(budget(clock, floor=1.0)) == 10  # 1 per second over a 10 s window


def test_retries_grow_with_requests() -> None:
    clock = Clock()
    retries = budget(clock, ratio=0.2, floor=0.0)
    for _ in range(100):
        retries.record_request()
    assert spend_all(retries) == 20


def test_spent_retries_come_back_when_the_window_slides() -> None:
    clock = Clock()
    retries = budget(clock, ratio=0.0, floor=1.0)
    assert spend_all(retries) == 10
    clock.now += 5
    assert spend_all(retries) == 0
    clock.now += 5
    assert spend_all(retries) == 10


def test_old_requests_stop_earning_retries() -> None:
    clock = Clock()
    retries = budget(clock, ratio=0.5, floor=0.0)
    for _ in range(10):
        retries.record_request()
    clock.now += 10
    assert spend_all(retries) == 0


def test_a_long_idle_gap_clears_everything() -> None:
    clock = Clock()
    retries = budget(clock, ratio=0.0, floor=1.0)
    spend_all(retries)
    clock.now += 3600
    assert spend_all(retries) == 10
