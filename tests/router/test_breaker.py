"""CircuitBreaker: closed → open → half-open probe → closed (or open again), on a fake clock."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tensorway.router.breaker import BreakerPolicy, BreakerState, CircuitBreaker, Outcome


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, **policy: object) -> CircuitBreaker:
    defaults: dict[str, object] = {
        "consecutive_failures": 3,
        "failure_rate": 0.5,
        "window": 10,
        "open_for": timedelta(seconds=2),
    }
    return CircuitBreaker(BreakerPolicy(**{**defaults, **policy}), clock=clock)  # type: ignore[arg-type]


def call(cb: CircuitBreaker, outcome: Outcome) -> bool:
    if not cb.acquire():
        return False
    cb.release(outcome)
    return True


def test_consecutive_failures_open_it(clock: Clock) -> None:
    cb = breaker(clock)
    for _ in range(2):
        call(cb, Outcome.FAILURE)
    assert cb.state is BreakerState.CLOSED
    call(cb, Outcome.FAILURE)
    assert cb.state is BreakerState.OPEN
    assert not cb.acquire()
    assert cb.retry_after() == timedelta(seconds=2)


def test_a_success_resets_the_run_of_failures(clock: Clock) -> None:
    cb = breaker(clock)
    for outcome in [Outcome.FAILURE, Outcome.FAILURE, Outcome.SUCCESS, Outcome.FAILURE, Outcome.FAILURE]:
        call(cb, outcome)
    assert cb.state is BreakerState.CLOSED


def test_failure_rate_over_the_window_opens_it(clock: Clock) -> None:
    cb = breaker(clock, consecutive_failures=100)
    for index in range(9):
        call(cb, Outcome.FAILURE if index % 2 else Outcome.SUCCESS)
    assert cb.state is BreakerState.CLOSED  # 4 of 9: the window is not full yet
    call(cb, Outcome.FAILURE)
    assert cb.state is BreakerState.OPEN  # 5 of 10


def test_ignored_outcomes_do_not_count(clock: Clock) -> None:
    cb = breaker(clock)
    for _ in range(10):
        call(cb, Outcome.IGNORED)
    call(cb, Outcome.FAILURE)
    call(cb, Outcome.FAILURE)
    assert cb.state is BreakerState.CLOSED


def test_half_open_lets_one_probe_and_closes_on_success(clock: Clock) -> None:
    cb = breaker(clock)
    for _ in range(3):
        call(cb, Outcome.FAILURE)
    clock.now += 2
    assert cb.state is BreakerState.HALF_OPEN
    assert cb.wants_probe()
    assert cb.acquire()
    assert not cb.acquire()  # one probe at a time
    assert not cb.wants_probe()
    cb.release(Outcome.SUCCESS)
    assert cb.state is BreakerState.CLOSED
    assert cb.acquire()


def test_a_failed_probe_opens_it_again(clock: Clock) -> None:
    cb = breaker(clock)
    for _ in range(3):
        call(cb, Outcome.FAILURE)
    clock.now += 2
    assert cb.acquire()
    cb.release(Outcome.FAILURE)
    assert cb.state is BreakerState.OPEN
    assert cb.trips == 2, "the first opening and the failed probe's"
    clock.now += 1.9
    assert not cb.available()
    clock.now += 0.1
    assert cb.available()


def test_an_ignored_probe_frees_the_slot_for_another(clock: Clock) -> None:
    cb = breaker(clock)
    for _ in range(3):
        call(cb, Outcome.FAILURE)
    clock.now += 2
    assert cb.acquire()
    cb.release(Outcome.IGNORED)
    assert cb.state is BreakerState.HALF_OPEN
    assert cb.wants_probe()


def test_late_answers_from_before_it_opened_change_nothing(clock: Clock) -> None:
    cb = breaker(clock)
    assert cb.acquire()  # in flight while the breaker opens
    for _ in range(3):
        call(cb, Outcome.FAILURE)
    cb.release(Outcome.SUCCESS)
    assert cb.state is BreakerState.OPEN
