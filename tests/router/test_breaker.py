"""CircuitBreaker: closed → open → half-open probe → closed (or open again), on a fake clock; and
which answers count against an endpoint."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from tensorway.router.breaker import (
    CLIENT_FAULTS,
    NEUTRAL,
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    Outcome,
    outcome_of,
)


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


@pytest.mark.parametrize(
    ("code", "reason", "caller_out_of_time", "expected"),
    [
        (grpc.StatusCode.OK, "", False, Outcome.SUCCESS),
        # Client errors: the request's fault, nothing about the endpoint.
        (grpc.StatusCode.INVALID_ARGUMENT, "TENSOR_INVALID", False, Outcome.IGNORED),
        (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", False, Outcome.IGNORED),
        (grpc.StatusCode.FAILED_PRECONDITION, "", False, Outcome.IGNORED),
        (grpc.StatusCode.OUT_OF_RANGE, "", False, Outcome.IGNORED),
        (grpc.StatusCode.ALREADY_EXISTS, "", False, Outcome.IGNORED),
        (grpc.StatusCode.ABORTED, "", False, Outcome.IGNORED),
        (grpc.StatusCode.PERMISSION_DENIED, "", False, Outcome.IGNORED),
        (grpc.StatusCode.UNAUTHENTICATED, "", False, Outcome.IGNORED),
        # A shed or a cancel: busy, or the caller left.
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", False, Outcome.IGNORED),
        (grpc.StatusCode.CANCELLED, "", False, Outcome.IGNORED),
        # The caller's deadline ran out, or the endpoint gave up while the caller still waited.
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", True, Outcome.IGNORED),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", False, Outcome.FAILURE),
        # Server faults.
        (grpc.StatusCode.UNAVAILABLE, "", False, Outcome.FAILURE),
        (grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY", False, Outcome.FAILURE),
        (grpc.StatusCode.INTERNAL, "", False, Outcome.FAILURE),
        (grpc.StatusCode.INTERNAL, "INTERNAL", False, Outcome.FAILURE),
        (grpc.StatusCode.UNKNOWN, "", False, Outcome.FAILURE),
        (grpc.StatusCode.UNIMPLEMENTED, "", False, Outcome.FAILURE),
        (grpc.StatusCode.DATA_LOSS, "", False, Outcome.FAILURE),
        # A model's own error answer: Triton answered, and the fault may be the request's.
        (grpc.StatusCode.INTERNAL, "BACKEND_ERROR", False, Outcome.IGNORED),
    ],
)
def test_only_server_faults_count_against_an_endpoint(
    code: grpc.StatusCode, reason: str, caller_out_of_time: bool, expected: Outcome
) -> None:
    assert outcome_of(code, reason, caller_out_of_time=caller_out_of_time) is expected


def test_every_status_code_is_classified_on_purpose() -> None:
    counted = {grpc.StatusCode.OK} | CLIENT_FAULTS | NEUTRAL
    server_faults = {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.DATA_LOSS,
    }
    assert counted | server_faults == set(grpc.StatusCode)
    assert not counted & server_faults


def test_a_flood_of_client_errors_neither_opens_nor_dilutes(clock: Clock) -> None:
    cb = breaker(clock, consecutive_failures=100, failure_rate=0.5, window=10)
    for _ in range(1000):
        call(cb, outcome_of(grpc.StatusCode.INVALID_ARGUMENT, "TENSOR_INVALID"))
    assert cb.state is BreakerState.CLOSED
    # Half of the real outcomes fail: the client errors in between do not hide it.
    for index in range(10):
        call(cb, Outcome.FAILURE if index % 2 else Outcome.SUCCESS)
        call(cb, outcome_of(grpc.StatusCode.INVALID_ARGUMENT, "TENSOR_INVALID"))
    assert cb.state is BreakerState.OPEN
