"""Fixed-window counters in Redis for the limits a request's descriptors match."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import redis.asyncio as redis
from prometheus_client import Counter
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from tensorway.ratelimit.limits import Limit, LimitsFile, RedisFailure, read_descriptor

logger = logging.getLogger(__name__)

PREFIX = "tensorway:ratelimit:"

DECISIONS = Counter(
    "tensorway_ratelimit_decisions_total",
    "Descriptors checked, by limit and outcome (ok, over_limit, redis_down).",
    ["limit", "outcome"],
)
COST = Counter(
    "tensorway_ratelimit_cost_total",
    "Cost counted against a limit, by limit and unit (requests, rows, bytes).",
    ["limit", "unit"],
)


@dataclass(frozen=True)
class Descriptor:
    """What Envoy asks about: the entries, and the hits Envoy says the request adds (its
    hits_addend, else 1); a cost entry among the entries overrides them."""

    entries: tuple[tuple[str, str], ...]
    hits: int = 1


@dataclass(frozen=True)
class Status:
    """The outcome for one descriptor; ``limit`` is None when no limit applies to it."""

    over_limit: bool
    limit: Limit | None = None
    remaining: int = 0
    reset_in: timedelta = timedelta(0)


@dataclass(frozen=True)
class Decision:
    """The outcome for a request: one status per descriptor, in the request's order."""

    statuses: list[Status]
    retry_after: timedelta | None
    """Set when the request is over limit: how long until the earliest window that blocks it ends."""

    @property
    def over_limit(self) -> bool:
        return self.retry_after is not None


class WindowCounters(Protocol):
    """Adds hits to fixed-window counters and returns their new totals."""

    async def add(self, increments: Sequence[tuple[str, int, timedelta]]) -> list[int]:
        """``increments`` are (key, hits, time to live); raises RedisError when the store fails."""
        ...

    async def close(self) -> None: ...


class RedisWindowCounters:
    """WindowCounters in Redis: INCRBY and EXPIRE in one round trip."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    @classmethod
    def connect(cls, url: str, timeout: timedelta) -> RedisWindowCounters:
        # No retries: a request waits at most one timeout before the failure mode decides.
        seconds = timeout.total_seconds()
        client = redis.Redis.from_url(
            url,
            socket_timeout=seconds,
            socket_connect_timeout=seconds,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client)

    async def add(self, increments: Sequence[tuple[str, int, timedelta]]) -> list[int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, hits, ttl in increments:
                pipe.incrby(key, hits)
                pipe.expire(key, ttl)
            replies = await pipe.execute()
        return [int(total) for total in replies[::2]]

    async def close(self) -> None:
        await self._redis.aclose()


class RateLimiter:
    """Counts each descriptor's hits against the limit it matches.

    A limit's window is fixed: counters are keyed by the window's index, so every replica of the
    service and every Envoy share them through Redis. While Redis fails, the configured failure
    mode answers, and Redis is left alone for ``outage_backoff`` so requests do not each wait
    out a timeout.
    """

    def __init__(
        self,
        limits: LimitsFile,
        counters: WindowCounters,
        *,
        closed_retry_after: timedelta = timedelta(seconds=1),
        outage_backoff: timedelta = timedelta(seconds=1),
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self._counters = counters
        self._closed_retry_after = closed_retry_after
        self._outage_backoff = outage_backoff.total_seconds()
        self._clock = clock
        self._monotonic = monotonic
        self._redis_down_until = 0.0

    async def check(self, domain: str, descriptors: Sequence[Descriptor]) -> Decision:
        """Add the descriptors' hits to their limits' counters and say whether any is over."""
        if domain != self.limits.domain:
            return Decision([Status(over_limit=False) for _ in descriptors], retry_after=None)
        now = self._clock()
        read = [read_descriptor(d.entries, d.hits) for d in descriptors]
        matched = [None if r is None else self.limits.find(r) for r in read]
        statuses = [Status(over_limit=False, limit=limit) for limit in matched]
        counted: list[tuple[int, Limit]] = []
        increments = []
        for i, (reading, limit) in enumerate(zip(read, matched, strict=True)):
            if reading is None or limit is None or reading.hits <= 0:
                continue
            window = limit.per.length.total_seconds()
            index = math.floor(now / window)
            key = f"{PREFIX}{self.limits.domain}:{limit.name}:{_key_part(reading.entries)}:{index}"
            counted.append((i, limit))
            increments.append((key, reading.hits, limit.per.length + timedelta(seconds=1)))
        if not counted:
            return Decision(statuses, retry_after=None)
        try:
            totals = await self._add(increments)
        except RedisError:
            return self._redis_down(statuses, counted)
        blocking: list[timedelta] = []
        for (i, limit), (_, cost, _), total in zip(counted, increments, totals, strict=True):
            window = limit.per.length.total_seconds()
            reset_in = timedelta(seconds=window - (now % window))
            over = total > limit.limit
            statuses[i] = Status(
                over_limit=over, limit=limit, remaining=max(0, limit.limit - total), reset_in=reset_in
            )
            DECISIONS.labels(limit.name, "over_limit" if over else "ok").inc()
            COST.labels(limit.name, limit.cost.value).inc(cost)
            if over:
                blocking.append(reset_in)
        return Decision(statuses, retry_after=min(blocking) if blocking else None)

    async def _add(self, increments: list[tuple[str, int, timedelta]]) -> list[int]:
        if self._monotonic() < self._redis_down_until:
            raise RedisError("Redis failed moments ago; not asked again yet")
        try:
            return await self._counters.add(increments)
        except RedisError as error:
            self._redis_down_until = self._monotonic() + self._outage_backoff
            logger.warning(
                "Redis is unreachable; rate limits fail %s",
                self.limits.redis_failure.value,
                extra={"error": str(error)},
            )
            raise

    def _redis_down(self, statuses: list[Status], counted: list[tuple[int, Limit]]) -> Decision:
        closed = self.limits.redis_failure is RedisFailure.CLOSED
        for i, limit in counted:
            DECISIONS.labels(limit.name, "redis_down").inc()
            statuses[i] = Status(over_limit=closed, limit=limit if closed else None)
        return Decision(statuses, retry_after=self._closed_retry_after if closed else None)

    async def close(self) -> None:
        await self._counters.close()


def _key_part(entries: tuple[tuple[str, str], ...]) -> str:
    # Values come from requests; escaping the separators keeps two descriptors from sharing a key.
    return ",".join(f"{_escape(key)}={_escape(value)}" for key, value in entries)


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace(",", "%2C").replace("=", "%3D").replace(":", "%3A")
