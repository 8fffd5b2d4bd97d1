"""Waiting for an event instead of for time: poll the condition itself until it holds, with a
deadline generous enough that a busy two-core machine only makes a test slower, never wrong.

A test that sleeps "long enough" fails when the machine is slow and wastes time when it is
fast; a test that asserts a duration measures the machine. Durations belong in the benchmarks.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

PATIENCE = 30.0
"""Seconds an awaited event may take before the test fails: far past what any should need."""


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    within: float = PATIENCE,
    interval: float = 0.02,
    what: str = "",
) -> T:
    """Call `check` (a function or a coroutine function) until it returns something true and
    return that; fail with `what` and the last value after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:.0f} s: {what or check!r} (last: {value!r})")
        await asyncio.sleep(interval)


def eventually_blocking(
    check: Callable[[], T], within: float = PATIENCE, interval: float = 0.1, what: str = ""
) -> T:
    """`eventually` for tests without an event loop."""
    deadline = time.monotonic() + within
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:.0f} s: {what or check!r} (last: {value!r})")
        time.sleep(interval)
    return value
