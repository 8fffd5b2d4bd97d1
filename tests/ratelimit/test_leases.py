"""Quota leases: limits from YAML, the cost of a request read from its tensors, slices of windows
leased from a real Redis by two replicas within the stated bound, and the failure modes while
Redis is unreachable."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import pydantic
import pytest
from google.rpc import error_details_pb2

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.ratelimit.core import Descriptor
from tensorway.ratelimit.leases import QuotaLeases, RedisLeaseStore, RequestCost, request_descriptors
from tensorway.ratelimit.limits import Cost, LimitsFile, RedisFailure, read_descriptor
from tensorway.router.service import LIMITS_FILE
from tensorway.runtime import InvalidArgument, ResourceExhausted
from tests.ports import free_port

LIMITS = LimitsFile.model_validate(
    {
        "limits": [
            {"name": "tenant-requests", "match": {"tenant": "*"}, "limit": 3, "per": "minute"},
            {"name": "vip-requests", "match": {"tenant": "vip"}, "limit": 100, "per": "minute"},
            {"name": "tenant-rows", "match": {"tenant": "*"}, "cost": "rows", "limit": 10, "per": "minute"},
            {"name": "model-requests", "match": {"model": "*"}, "limit": 1000, "per": "second"},
        ]
    }
)
NOW = 1_800_000_000.0  # the start of a minute, so a test's window does not roll over under it


class CountingStore:
    """A Redis lease store that counts the refills asked of it."""

    def __init__(self, store: RedisLeaseStore) -> None:
        self.store = store
        self.calls = 0

    async def take(self, key: str, wanted: int, limit: int, ttl: timedelta) -> int:
        self.calls += 1
        return await self.store.take(key, wanted, limit, ttl)

    async def close(self) -> None:
        await self.store.close()


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[Callable[[LimitsFile], list[QuotaLeases]]]:
    """Makes two limiters of some limits, as two router replicas would hold, on one Redis, at the
    start of a minute."""
    made: list[QuotaLeases] = []

    def make(limits: LimitsFile) -> list[QuotaLeases]:
        leases = [
            QuotaLeases(
                limits,
                CountingStore(RedisLeaseStore.connect(redis_url, timedelta(seconds=2))),
                slice_share=0.05,
                clock=lambda: NOW,
            )
            for _ in range(2)
        ]
        made.extend(leases)
        return leases

    try:
        yield make
    finally:
        for limiter in made:
            await limiter.close()


def tenant_name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def test_the_most_specific_limit_applies_and_costs_are_not_match_keys() -> None:
    def limit_of(*entries: tuple[str, str]) -> str | None:
        counted = read_descriptor(entries, 1)
        assert counted is not None
        found = LIMITS.find(counted)
        return None if found is None else found.name

    assert limit_of(("tenant", "acme")) == "tenant-requests"
    assert limit_of(("tenant", "vip")) == "vip-requests"
    assert limit_of(("tenant", "acme"), ("rows", "7")) == "tenant-rows"
    assert limit_of(("tenant", "acme"), ("bytes", "7")) is None  # no bytes limit here
    assert limit_of(("tenant", "acme"), ("model", "digits")) is None
    counted = read_descriptor((("tenant", "acme"), ("rows", "7")), 1)
    assert counted is not None
    assert (counted.cost, counted.hits, counted.entries) == (Cost.ROWS, 7, (("tenant", "acme"),))
    assert read_descriptor((("tenant", "acme"), ("rows", "many")), 1) is None
    assert read_descriptor((("tenant", ""),), 1) is None


def test_limits_files_are_checked_and_the_shipped_one_loads() -> None:
    with pytest.raises(pydantic.ValidationError, match="carry a request's cost"):
        LimitsFile.model_validate(
            {"limits": [{"name": "x", "match": {"rows": "*"}, "limit": 1, "per": "second"}]}
        )
    with pytest.raises(pydantic.ValidationError, match="unique"):
        LimitsFile.model_validate(
            {"limits": [{"name": "x", "match": {"tenant": "*"}, "limit": 1, "per": "second"}] * 2}
        )
    shipped = LimitsFile.load(LIMITS_FILE)
    assert {limit.name for limit in shipped.limits} >= {
        "tenant-requests",
        "tenant-rows",
        "tenant-bytes",
        "model-requests",
    }


def infer_request(*shapes: list[int]) -> pb.InferRequest:
    request = pb.InferRequest(model_name="digits", id="r")
    for i, shape in enumerate(shapes):
        size = 1
        for dimension in shape:
            size *= dimension
        request.inputs.add(name=f"in{i}", datatype="FP32", shape=shape).contents.fp32_contents.extend(
            [1.0] * size
        )
    return request


def unpacked(shape: list[int]) -> bytes:
    """A Tensor whose shape is written unpacked, one varint field per dimension, as proto2-era
    writers do; parsers accept both."""
    tensor = tensor_pb2.Tensor(name="x", datatype="FP32").SerializeToString()
    for dimension in shape:
        tensor += bytes([3 << 3 | 0, dimension])  # field 3, varint; dimensions under 128
    return tensor


def test_rows_are_the_largest_first_dimension_and_bytes_the_serialized_size() -> None:
    request = infer_request([2, 64], [6, 1], [3])
    data = request.SerializeToString()
    assert RequestCost.of(data) == RequestCost(rows=6, size=len(data))
    # Unpacked shapes count too, as a parser would read them.
    field = 4 << 3 | 2  # InferRequest.inputs
    tensor = unpacked([9, 2])
    handmade = pb.InferRequest(model_name="digits").SerializeToString() + bytes([field, len(tensor)]) + tensor
    assert pb.InferRequest.FromString(handmade).inputs[0].shape == [9, 2]
    assert RequestCost.of(handmade).rows == 9
    # A scalar is one row; no inputs, no rows; a negative dimension counts none.
    assert RequestCost.of(infer_request([]).SerializeToString()).rows == 1
    assert RequestCost.of(pb.InferRequest(model_name="digits").SerializeToString()).rows == 0
    assert RequestCost.of(infer_request([-1, 3]).SerializeToString()).rows == 0
    with pytest.raises(InvalidArgument):
        RequestCost.of(pb.InferRequest(model_name="digits").SerializeToString() + bytes([field, 40, 1]))


def test_a_request_is_counted_under_its_tenant_and_model() -> None:
    entries = [d.entries for d in request_descriptors("acme", "digits", RequestCost(rows=6, size=300))]
    assert entries == [
        (("tenant", "acme"),),
        (("tenant", "acme"), ("rows", "6")),
        (("tenant", "acme"), ("bytes", "300")),
        (("model", "digits"),),
        (("model", "digits"), ("rows", "6")),
    ]


async def test_counts_per_window_until_over_limit(redis_url: str) -> None:
    now = NOW
    limiter = QuotaLeases(LIMITS, RedisLeaseStore.connect(redis_url, timedelta(seconds=2)), clock=lambda: now)
    tenant = tenant_name()
    try:
        decisions = [await limiter.charge([Descriptor((("tenant", tenant),))]) for _ in range(4)]
        assert [d.over_limit for d in decisions] == [False, False, False, True]
        refused = decisions[3]
        assert refused.refused_by is not None
        assert refused.refused_by.name == "tenant-requests"
        assert refused.retry_after == timedelta(seconds=60)  # the window's end
        # Rows count against the rows limit only; a request that would pass it is refused whole.
        assert not (await limiter.charge([Descriptor((("tenant", tenant), ("rows", "8")))])).over_limit
        assert (await limiter.charge([Descriptor((("tenant", tenant), ("rows", "3")))])).over_limit
        assert not (await limiter.charge([Descriptor((("tenant", tenant), ("rows", "2")))])).over_limit
        # Other tenants have their own counters; a literal match has its own limit.
        assert not (await limiter.charge([Descriptor((("tenant", f"{tenant}-b"),))])).over_limit
        # The next window starts from zero.
        now = NOW + 60
        assert not (await limiter.charge([Descriptor((("tenant", tenant),))])).over_limit
        now = NOW + 61.5
        assert (await limiter.charge([Descriptor((("tenant", tenant),))] * 3)).retry_after == timedelta(
            seconds=58.5
        )
    finally:
        await limiter.close()


async def test_admit_refuses_with_retry_info_naming_the_limit(redis_url: str) -> None:
    limiter = QuotaLeases(
        LIMITS, RedisLeaseStore.connect(redis_url, timedelta(seconds=2)), clock=lambda: NOW + 20
    )
    tenant = tenant_name()
    six_rows = infer_request([6, 64]).SerializeToString()
    try:
        await limiter.admit(tenant, "digits", six_rows)
        with pytest.raises(ResourceExhausted) as refused:
            await limiter.admit(tenant, "digits", six_rows)
        status = refused.value.to_status_proto()
        details = {detail.TypeName(): detail for detail in status.details}
        info = error_details_pb2.ErrorInfo()
        details["google.rpc.ErrorInfo"].Unpack(info)
        assert info.metadata["limit"] == "tenant-rows"
        retry = error_details_pb2.RetryInfo()
        details["google.rpc.RetryInfo"].Unpack(retry)
        assert retry.retry_delay.ToTimedelta() == timedelta(seconds=40)
        # The refused request spent nothing: a smaller one still fits the rows, and the requests
        # limit counted one request so far.
        await limiter.admit(tenant, "digits", infer_request([4, 64]).SerializeToString())
    finally:
        await limiter.close()


async def test_two_replicas_never_exceed_a_limit_and_waste_at_most_a_slice_each(
    replicas: Callable[[LimitsFile], list[QuotaLeases]],
) -> None:
    # 1,000 requests a second for the model; a slice is 5%: 50. Both replicas keep asking, at once.
    leases = replicas(LIMITS)
    model = f"m-{uuid.uuid4().hex[:8]}"
    limit, slice_size = 1000, leases[0].slice_of(LIMITS.limits[3])
    assert slice_size == 50

    async def ask(limiter: QuotaLeases) -> bool:
        return not (await limiter.charge([Descriptor((("model", model),))])).over_limit

    admitted = await asyncio.gather(*(ask(leases[i % 2]) for i in range(2 * limit)))
    assert limit - len(leases) * slice_size <= sum(admitted) <= limit
    stores = [limiter._store for limiter in leases]
    calls = sum(store.calls for store in stores if isinstance(store, CountingStore))
    # One refill per slice, plus the ones that found the window spent: not one per request.
    assert calls <= limit // slice_size + 2 * len(leases)


async def test_two_replicas_within_the_bound_with_uneven_costs_and_one_replica_idle(
    replicas: Callable[[LimitsFile], list[QuotaLeases]],
) -> None:
    rng = random.Random(7)
    tenant = tenant_name()
    limits = LimitsFile.model_validate(
        {
            "limits": [
                {"name": "t-rows", "match": {"tenant": "*"}, "cost": "rows", "limit": 2000, "per": "minute"}
            ]
        }
    )
    leases = replicas(limits)
    slice_size = leases[0].slice_of(limits.limits[0])
    assert slice_size == 100

    async def ask(limiter: QuotaLeases, rows: int) -> int:
        decision = await limiter.charge([Descriptor((("tenant", tenant), ("rows", str(rows))))])
        return 0 if decision.over_limit else rows

    # The first replica leases a slice and then sees one request only; the second keeps asking.
    first = await ask(leases[0], 1)
    rest = await asyncio.gather(*(ask(leases[1], rng.randint(1, 5)) for _ in range(1500)))
    granted = first + sum(rest)
    assert 2000 - len(leases) * slice_size <= granted <= 2000
    assert granted < 2000  # the idle replica still holds most of its slice


async def test_concurrent_requests_on_a_spent_lease_make_one_redis_call(
    replicas: Callable[[LimitsFile], list[QuotaLeases]],
) -> None:
    limiter = replicas(LIMITS)[0]
    store = limiter._store
    assert isinstance(store, CountingStore)
    model = f"m-{uuid.uuid4().hex[:8]}"
    decisions = await asyncio.gather(*(limiter.charge([Descriptor((("model", model),))]) for _ in range(100)))
    assert not any(d.over_limit for d in decisions)
    assert store.calls == 2  # two slices of 50


@pytest.mark.parametrize(("mode", "passed"), [("open", 2000), ("closed", 0)])
async def test_redis_down_holds_the_failure_mode_under_2000_concurrent_calls(mode: str, passed: int) -> None:
    limits = LIMITS.model_copy(update={"redis_failure": RedisFailure(mode)})
    store = CountingStore(RedisLeaseStore.connect(f"redis://127.0.0.1:{free_port()}/0", timedelta(seconds=1)))
    limiter = QuotaLeases(limits, store, closed_retry_after=timedelta(seconds=2), clock=lambda: NOW)
    try:
        decisions = await asyncio.gather(
            *(limiter.charge([Descriptor((("tenant", "acme"),))]) for _ in range(2000))
        )
        assert sum(not d.over_limit for d in decisions) == passed
        if mode == "closed":
            assert {d.retry_after for d in decisions} == {timedelta(seconds=2)}
            assert {d.refused_by.name for d in decisions if d.refused_by} == {"tenant-requests"}
        # The outage backoff: Redis is not asked per request while it is down.
        assert store.calls == 1
    finally:
        await limiter.close()


async def test_closed_limits_name_the_limit_while_redis_is_down() -> None:
    limits = LIMITS.model_copy(update={"redis_failure": RedisFailure.CLOSED})
    store = RedisLeaseStore.connect(f"redis://127.0.0.1:{free_port()}/0", timedelta(seconds=1))
    limiter = QuotaLeases(limits, store, clock=lambda: NOW)
    try:
        with pytest.raises(ResourceExhausted) as refused:
            await limiter.admit("acme", "digits", infer_request([1, 4]).SerializeToString())
        assert refused.value.metadata == {"limit": "tenant-requests"}
        assert "cannot be checked" in refused.value.message
    finally:
        await limiter.close()


def test_the_shipped_limits_file_is_where_the_router_reads_it() -> None:
    shipped = Path(__file__).parents[2] / "services" / "tensorway" / "router" / "limits.yaml"
    assert shipped == LIMITS_FILE
