"""Redis in front of PostgreSQL: cache-aside values, invalidation by pub/sub, one loader per key.

Every cached value carries the registry revision it was read at, and a write leaves a
tombstone at its revision instead of deleting the key. A reader that loaded an older row
before the write committed can then not put it back: a value only replaces one whose
revision is not newer. Redis is optional at run time: when it fails, reads go to PostgreSQL,
and once it answers again the registry's keys are dropped, since invalidations were missed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import timedelta
from typing import Generic, TypeVar

import redis.asyncio as redis
from prometheus_client import Counter
from redis.asyncio.client import PubSub
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from tensorway.registry.domain import Change
from tensorway.registry.store import change_from_json, change_to_json

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

PREFIX = "tensorway:registry:"
# A value is the revision as 20 zero-padded digits, a kind byte, then the payload; padded
# digits compare as text in the same order as the numbers they write.
REVISION_DIGITS = 20
VALUE = b"V"
TOMBSTONE = b"T"
# Sets the key unless it holds a newer revision (equal revisions replace: same data).
SET_IF_NOT_NEWER = """
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, 20) > string.sub(ARGV[1], 1, 20) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

CACHE_LOOKUPS = Counter(
    "tensorway_registry_cache_lookups_total",
    "Registry reads answered by Redis, and loads from PostgreSQL after misses (one per key at a time).",
    ["kind", "tier"],
)
REDIS_ERRORS = Counter("tensorway_registry_redis_errors_total", "Redis calls that failed; reads fell back.")


def model_key(model: str) -> str:
    return f"{PREFIX}model:{model}"


def model_version_key(model: str, version: str) -> str:
    return f"{PREFIX}version:{model}/{version}"


def pool_key(pool: str) -> str:
    return f"{PREFIX}pool:{pool}"


def deployment_key(model: str, deployment: str) -> str:
    return f"{PREFIX}deployment:{model}/{deployment}"


def route_key(model: str) -> str:
    return f"{PREFIX}route:{model}"


@dataclass(frozen=True)
class Cached:
    """A value found in Redis: the revision it was read at, and its payload."""

    revision: int
    payload: bytes


class SingleFlight(Generic[K, V]):
    """At most one load per key at a time; callers that arrive meanwhile share its result.

    The load runs shielded, so a caller that gives up does not cancel it for the others.
    """

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Future[V]] = {}

    async def do(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(load())
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        return await asyncio.shield(flight)

    def _landed(self, key: K, flight: asyncio.Future[V]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved here too, so a load nobody awaits anymore logs nothing


class RedisCache:
    """Versioned cache-aside values and the change channel in Redis."""

    def __init__(self, client: redis.Redis, ttl: timedelta, outage_backoff: timedelta) -> None:
        self._client = client
        # Redis's channels are one namespace for the whole server, unlike its keys: registries
        # with a database each on one Redis must not hear each other's changes, whose
        # revisions are of another PostgreSQL.
        database = client.connection_pool.connection_kwargs.get("db", 0)
        self._changes_channel = f"{PREFIX}changes:{database}"
        self._ttl_ms = int(ttl.total_seconds() * 1000)
        self._outage_backoff = outage_backoff.total_seconds()
        self._set_if_not_newer = client.register_script(SET_IF_NOT_NEWER)
        self._down_until = 0.0
        self._missed_invalidations = False
        self._flushing = asyncio.Lock()

    @classmethod
    def connect(
        cls, url: str, *, timeout: timedelta, ttl: timedelta, outage_backoff: timedelta
    ) -> RedisCache:
        # No retries inside redis-py: a failed call falls back to PostgreSQL at once.
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout.total_seconds(),
            socket_connect_timeout=timeout.total_seconds(),
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
        return cls(client, ttl, outage_backoff)

    async def close(self) -> None:
        await self._client.aclose()

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        REDIS_ERRORS.inc()
        if self.up:
            logger.warning("Redis unreachable, reading through to PostgreSQL: %s", exc)
        self._down_until = time.monotonic() + self._outage_backoff
        self._missed_invalidations = True

    async def _usable(self) -> bool:
        """False while Redis is known down; after an outage, first drops what may be stale."""
        if not self.up:
            return False
        if self._missed_invalidations:
            # Callers wait for the flush rather than read what it is about to drop.
            async with self._flushing:
                if not self._missed_invalidations:
                    return self.up
                try:
                    async for key in self._client.scan_iter(match=PREFIX + "*", count=500):
                        await self._client.unlink(key)
                except (RedisError, OSError) as exc:
                    self._failed(exc)
                    return False
                self._missed_invalidations = False
                logger.info("Redis is back; dropped the registry's keys written before the outage")
        return True

    async def get(self, key: str) -> Cached | None:
        """The cached value, or None on a miss, a tombstone or Redis down."""
        if not await self._usable():
            return None
        try:
            raw: bytes | None = await self._client.get(key)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return None
        if raw is None or raw[REVISION_DIGITS : REVISION_DIGITS + 1] != VALUE:
            return None
        return Cached(int(raw[:REVISION_DIGITS]), raw[REVISION_DIGITS + 1 :])

    async def put(self, key: str, revision: int, payload: bytes) -> None:
        """Cache a value read at `revision`, unless Redis holds a newer one (or its tombstone)."""
        await self._store(key, revision, VALUE + payload)

    async def invalidate(self, change: Change) -> None:
        """Tombstone every key a committed change made stale."""
        for key in change.keys:
            await self._store(key, change.revision, TOMBSTONE)

    async def _store(self, key: str, revision: int, body: bytes) -> None:
        if not await self._usable():
            return
        value = str(revision).zfill(REVISION_DIGITS).encode() + body
        try:
            await self._set_if_not_newer(keys=[key], args=[value, self._ttl_ms])
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def publish(self, change: Change) -> None:
        """Tell every replica about a committed change."""
        if not self.up:
            return
        try:
            await self._client.publish(self._changes_channel, change_to_json(change))
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def changes(self, reconnect_delay: timedelta) -> AsyncIterator[Change]:
        """Changes other replicas publish, for as long as the caller iterates; reconnects on failure."""
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._changes_channel)
                while True:
                    # A timeout instead of blocking forever: a dead connection shows up as an error.
                    message = await pubsub.get_message(timeout=reconnect_delay.total_seconds() * 10)
                    if message is not None and message["type"] == "message":
                        yield change_from_json(message["data"])
            except (RedisError, OSError) as exc:
                self._failed(exc)
            finally:
                await _quietly_close(pubsub)
            await asyncio.sleep(reconnect_delay.total_seconds())


async def _quietly_close(pubsub: PubSub) -> None:
    try:
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    except (RedisError, OSError):
        logger.debug("closing a broken Redis subscription failed", exc_info=True)
