"""Global limits without a remote call per request: quota leasing.

Every router replica counts a request against the limits itself. For each key a limit counts
under (a limit and the values it matched, such as ``tenant-rows`` for tenant ``acme``) it leases a
slice of the current fixed window from Redis, in one atomic script that grants
``min(slice, limit - used)``, adds the grant to the window's counter and sets its expiry, and then
spends the slice in the process. A request goes to Redis only when a lease it needs cannot pay
for it: the common request takes no lock, awaits nothing and leaves the process never. Refills
run under a lock per key, so the requests that find a lease spent together wait for one call.

The bound, per key and window, with R replicas and a slice of S units:

* The limit is never exceeded: Redis grants no more than the window has left, atomically, and a
  replica admits only what it was granted.
* What goes unused is what the replicas hold when the window ends. A replica asks for more only
  when its lease cannot pay for a request, and then for one slice (or what that request lacks,
  when that is more than a slice); after admitting the request it holds less than a slice. So
  while every replica keeps asking, at least ``limit - R * S`` units are admitted (requests that
  cost more than a slice can leave a replica holding less than their cost instead). Once Redis
  grants less than was asked, the window is spent everywhere and further requests are refused
  without asking it again.

While Redis fails, each limit fails open or closed as the limits file's ``redis_failure`` says,
and Redis is left alone for an outage backoff, so requests do not each wait out a timeout. A lease
already granted is still spent while Redis is down.

The cost of a request is computed here from its serialized tensors, never taken from a header:
rows are the largest first dimension among its inputs, bytes its serialized length.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

import redis.asyncio as redis
from prometheus_client import Counter
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from tensorway.common.v1 import error_pb2
from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tensorway.ratelimit.core import Decision, Descriptor, Status, window_key
from tensorway.ratelimit.limits import Cost, Counted, Limit, LimitsFile, RedisFailure, read_descriptor
from tensorway.runtime import FieldViolation, InvalidArgument, ResourceExhausted
from tensorway.tensors import wire

logger = logging.getLogger(__name__)

LEASED = Counter(
    "tensorway_ratelimit_leased_total",
    "Units of a limit's windows leased from Redis by this replica, by limit and unit.",
    ["limit", "unit"],
)
REFILLS = Counter(
    "tensorway_ratelimit_refills_total",
    "Lease refills asked of Redis, by limit and outcome (granted, exhausted, redis_down).",
    ["limit", "outcome"],
)
REFUSED = Counter(
    "tensorway_ratelimit_refused_total",
    "Requests refused, by the limit that refused them and why (over_limit, or redis_down for a"
    " fail-closed limit while Redis is down).",
    ["limit", "reason"],
)

_INPUTS = inference_pb.InferRequest.INPUTS_FIELD_NUMBER
_SHAPE = 3  # tensorway.common.v1.Tensor.shape
_UNITS = (Cost.REQUESTS, Cost.ROWS, Cost.BYTES)
# Keys (tenants x models x limits) past which the local leases are forgotten and leased anew: what
# they held is under-use, never over-use.
MAX_KEYS = 100_000

# Grants min(ARGV[1] wanted, ARGV[2] limit - used) of the window KEYS[1], counts it and keeps the
# counter for ARGV[3] ms. One script, so two replicas never both get the window's last units.
LEASE_SCRIPT = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - used)
if grant <= 0 then
  return 0
end
redis.call('INCRBY', KEYS[1], grant)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return grant
"""


class LeaseStore(Protocol):
    """Where the replicas lease slices of a window from."""

    async def take(self, key: str, wanted: int, limit: int, ttl: timedelta) -> int:
        """Grant up to ``wanted`` of the ``limit`` units of window ``key``; raises RedisError when
        the store fails."""
        ...

    async def close(self) -> None: ...


class RedisLeaseStore:
    """LeaseStore in Redis: one Lua script per refill."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._script = client.register_script(LEASE_SCRIPT)

    @classmethod
    def connect(cls, url: str, timeout: timedelta) -> RedisLeaseStore:
        # No retries: a refill waits at most one timeout before the failure mode decides.
        seconds = timeout.total_seconds()
        client = redis.Redis.from_url(
            url, socket_timeout=seconds, socket_connect_timeout=seconds, retry=Retry(NoBackoff(), 0)
        )
        return cls(client)

    async def take(self, key: str, wanted: int, limit: int, ttl: timedelta) -> int:
        granted = await self._script(keys=[key], args=[wanted, limit, int(ttl.total_seconds() * 1000)])
        return int(granted)

    async def close(self) -> None:
        await self._redis.aclose()


@dataclass(frozen=True, slots=True)
class RequestCost:
    """What a request costs, read from its serialized InferRequest."""

    rows: int
    size: int
    """Bytes."""

    @classmethod
    def of(cls, request: bytes, inputs_field: int = _INPUTS) -> RequestCost:
        """Rows: the largest first dimension among the inputs; bytes: the serialized length.

        `inputs_field` is where the message keeps its input tensors: 4 in tensorway's InferRequest,
        5 in Triton's ModelInferRequest; a tensor's shape is field 3 in both."""
        try:
            rows = wire.largest_first_dimension(request, inputs_field, _SHAPE)
        except wire.MalformedMessage as error:
            raise InvalidArgument(
                "the request is not a serialized InferRequest", [FieldViolation("inputs", str(error))]
            ) from error
        return cls(rows, len(request))


def request_descriptors(tenant: str, model: str, cost: RequestCost) -> list[Descriptor]:
    """The descriptors a request is counted under: its tenant's requests, rows and bytes, and its
    model's requests and rows."""
    return [
        Descriptor((("tenant", tenant),)),
        Descriptor((("tenant", tenant), ("rows", str(cost.rows)))),
        Descriptor((("tenant", tenant), ("bytes", str(cost.size)))),
        Descriptor((("model", model),)),
        Descriptor((("model", model), ("rows", str(cost.rows)))),
    ]


@dataclass(eq=False, slots=True)
class _Lease:
    """This replica's share of one key's current window."""

    limit: Limit
    entries: tuple[tuple[str, str], ...]
    seconds: float
    window: int = -1
    remaining: int = 0
    exhausted: bool = False
    """Redis granted less than was asked in this window: nothing is left to lease until it ends."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def current(self, now: float) -> int:
        """The window the lease is for, moved on (and emptied) when `now` is in a later one; a
        request that read the clock just before a window ended spends from the next."""
        index = int(now // self.seconds)
        if index > self.window:
            self.window, self.remaining, self.exhausted = index, 0, False
        return self.window

    def can_pay(self, now: float, hits: int) -> bool:
        self.current(now)
        return self.remaining >= hits

    def reset_in(self, now: float) -> timedelta:
        return timedelta(seconds=self.seconds - now % self.seconds)


@dataclass(slots=True)
class _Charge:
    index: int
    """The descriptor's position in the request."""
    lease: _Lease
    hits: int


class QuotaLeases:
    """The limits of a limits file, counted through leases of Redis windows (see the module)."""

    def __init__(
        self,
        limits: LimitsFile,
        store: LeaseStore,
        *,
        slice_share: float = 0.05,
        outage_backoff: timedelta = timedelta(seconds=1),
        closed_retry_after: timedelta = timedelta(seconds=1),
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < slice_share <= 1:
            raise ValueError(f"a slice is a share of a limit, in (0, 1]; got {slice_share}")
        self.limits = limits
        self._store = store
        self._slice_share = slice_share
        self._outage_backoff = outage_backoff.total_seconds()
        self._closed_retry_after = closed_retry_after
        self._clock = clock
        self._monotonic = monotonic
        self._redis_down_until = 0.0
        self._leases: dict[tuple[tuple[tuple[str, str], ...], Cost], _Lease | None] = {}
        self._plans: dict[tuple[str, str], tuple[tuple[_Lease, int], ...]] = {}

    def slice_of(self, limit: Limit) -> int:
        """The units one refill asks for: the configured share of the limit, at least one."""
        return max(1, int(limit.limit * self._slice_share))

    async def admit(self, tenant: str, model: str, request: bytes, inputs_field: int = _INPUTS) -> None:
        """Count a serialized InferRequest (or, with its `inputs_field`, Triton's ModelInferRequest)
        against its tenant's and model's limits.

        Raises RESOURCE_EXHAUSTED, with RetryInfo (until the window ends) and ErrorInfo metadata
        naming the limit, when one of them refuses it; INVALID_ARGUMENT when its tensors cannot be
        read.
        """
        cost = RequestCost.of(request, inputs_field)
        plan = self._plans.get((tenant, model))
        if plan is None:
            plan = self._plan(tenant, model)
        hits = (1, cost.rows, cost.size)  # by _UNITS
        now = self._clock()
        # The common case, inline: every lease pays, with no allocation, lock or await.
        for lease, unit in plan:
            if not lease.can_pay(now, hits[unit]):
                break
        else:
            for lease, unit in plan:
                lease.remaining -= hits[unit]
            return
        charges = [_Charge(i, lease, hits[unit]) for i, (lease, unit) in enumerate(plan)]
        decision = await self._charge(charges, len(charges))
        limit, retry_after = decision.refused_by, decision.retry_after
        if limit is None or retry_after is None:
            return
        if decision.redis_down:
            message = f"the limit {limit.name!r} cannot be checked while its store is down"
        else:
            message = (
                f"the limit {limit.name!r} of {limit.limit} {limit.cost.value} per {limit.per.value} is spent"
            )
        raise ResourceExhausted(
            f"{message}; retry after {retry_after.total_seconds():.3f} s",
            retry_after=retry_after,
            reason=error_pb2.ERROR_REASON_RESOURCE_EXHAUSTED,
            metadata={"limit": limit.name},
        )

    async def charge(self, descriptors: Sequence[Descriptor]) -> Decision:
        """Count the descriptors' hits against the limits they match; spend nothing when refused.

        Descriptors counted under the same key add up; the status of the first of them tells.
        """
        charges: dict[int, _Charge] = {}  # by lease: descriptors counted under one key add up
        for i, descriptor in enumerate(descriptors):
            counted = read_descriptor(descriptor.entries, descriptor.hits)
            if counted is None or counted.hits <= 0:
                continue
            lease = self._lease(counted.entries, counted.cost)
            if lease is None:
                continue
            if id(lease) in charges:
                charges[id(lease)].hits += counted.hits
            else:
                charges[id(lease)] = _Charge(i, lease, counted.hits)
        return await self._charge(list(charges.values()), len(descriptors))

    def _plan(self, tenant: str, model: str) -> tuple[tuple[_Lease, int], ...]:
        self._forget_if_full()
        wanted = (
            ((("tenant", tenant),), Cost.REQUESTS),
            ((("tenant", tenant),), Cost.ROWS),
            ((("tenant", tenant),), Cost.BYTES),
            ((("model", model),), Cost.REQUESTS),
            ((("model", model),), Cost.ROWS),
        )
        plan = []
        for entries, unit in wanted:
            lease = self._lease(entries, unit)
            if lease is not None:
                plan.append((lease, _UNITS.index(unit)))
        self._plans[(tenant, model)] = found = tuple(plan)
        return found

    def _lease(self, entries: tuple[tuple[str, str], ...], unit: Cost) -> _Lease | None:
        key = (entries, unit)
        if key in self._leases:
            return self._leases[key]
        self._forget_if_full()
        limit = self.limits.find(Counted(entries, unit, 1))
        lease = None if limit is None else _Lease(limit, entries, limit.per.length.total_seconds())
        self._leases[key] = lease
        return lease

    def _forget_if_full(self) -> None:
        if len(self._leases) >= MAX_KEYS or len(self._plans) >= MAX_KEYS:
            self._leases.clear()
            self._plans.clear()

    async def _charge(self, charges: list[_Charge], count: int) -> Decision:
        waived: set[int] = set()  # charges of fail-open limits let through while Redis is down
        while True:
            now = self._clock()
            # Checked and spent with no await in between: no other request spends meanwhile.
            short = [c for c in charges if c.index not in waived and not c.lease.can_pay(now, c.hits)]
            if not short:
                for c in charges:
                    if c.index not in waived:
                        c.lease.remaining -= c.hits
                return Decision([Status(over_limit=False)] * count, retry_after=None)
            spent = [c for c in short if c.lease.exhausted]
            if spent:
                return self._refused(spent, count, now)
            if self._monotonic() < self._redis_down_until:
                closed = self._redis_down(short, waived)
                if closed:
                    return self._closed(closed, count)
                continue
            for c in short:
                await self._refill(c, now)

    async def _refill(self, charge: _Charge, now: float) -> None:
        lease = charge.lease
        async with lease.lock:
            index = lease.current(now)
            if lease.remaining >= charge.hits or lease.exhausted:
                return  # a request that waited on the lock before this one refilled it
            if self._monotonic() < self._redis_down_until:
                return
            limit = lease.limit
            wanted = max(self.slice_of(limit), charge.hits - lease.remaining)
            key = window_key(self.limits.domain, limit, lease.entries, index)
            try:
                granted = await self._store.take(
                    key, wanted, limit.limit, limit.per.length + timedelta(seconds=1)
                )
            except RedisError as error:
                self._redis_down_until = self._monotonic() + self._outage_backoff
                REFILLS.labels(limit.name, "redis_down").inc()
                logger.warning(
                    "Redis is unreachable; limits fail %s",
                    self.limits.redis_failure.value,
                    extra={"error": str(error)},
                )
                return
            if lease.window == index:  # the window did not end while Redis answered
                lease.remaining += granted
                lease.exhausted = granted < wanted
            LEASED.labels(limit.name, limit.cost.value).inc(granted)
            REFILLS.labels(limit.name, "granted" if granted == wanted else "exhausted").inc()

    def _refused(self, spent: list[_Charge], count: int, now: float) -> Decision:
        statuses = [Status(over_limit=False)] * count
        for c in spent:
            statuses[c.index] = Status(
                over_limit=True,
                limit=c.lease.limit,
                remaining=c.lease.remaining,
                reset_in=c.lease.reset_in(now),
            )
        REFUSED.labels(spent[0].lease.limit.name, "over_limit").inc()
        return Decision(statuses, retry_after=max(c.lease.reset_in(now) for c in spent))

    def _redis_down(self, short: list[_Charge], waived: set[int]) -> list[_Charge]:
        """Waive the fail-open charges Redis cannot refill; the fail-closed ones, returned, refuse."""
        if self.limits.redis_failure is RedisFailure.CLOSED:
            return short
        waived.update(c.index for c in short)
        return []

    def _closed(self, closed: list[_Charge], count: int) -> Decision:
        statuses = [Status(over_limit=False)] * count
        for c in closed:
            statuses[c.index] = Status(over_limit=True, limit=c.lease.limit)
        REFUSED.labels(closed[0].lease.limit.name, "redis_down").inc()
        return Decision(statuses, retry_after=self._closed_retry_after, redis_down=True)

    async def close(self) -> None:
        await self._store.close()
