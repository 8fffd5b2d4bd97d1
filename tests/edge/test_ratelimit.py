"""The ratelimit service: limits from YAML, fixed windows in real Redis, the failure modes when
Redis is down, and ShouldRateLimit over gRPC as Envoy calls it."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pydantic
import pytest
from prometheus_client import REGISTRY

from tensorway.ratelimit.core import Descriptor, RateLimiter, RedisWindowCounters
from tensorway.ratelimit.envoy import rls_pb2 as pb
from tensorway.ratelimit.envoy import rls_pb2_grpc as pb_grpc
from tensorway.ratelimit.limits import Cost, LimitsFile, RedisFailure, read_descriptor
from tensorway.ratelimit.service import Settings, create

LIMITS = LimitsFile.model_validate(
    {
        "limits": [
            {"name": "tenant-requests", "match": {"tenant": "*"}, "limit": 3, "per": "minute"},
            {"name": "vip-requests", "match": {"tenant": "vip"}, "limit": 100, "per": "minute"},
            {"name": "tenant-rows", "match": {"tenant": "*"}, "cost": "rows", "limit": 10, "per": "minute"},
            {"name": "model-requests", "match": {"model": "*"}, "limit": 5, "per": "second"},
        ]
    }
)
NOW = 1_800_000_000.0  # the start of a minute, so a test's window does not roll over under it


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
    assert (counted.cost, counted.hits, counted.entries) == (
        Cost.ROWS,
        7,
        (("tenant", "acme"),),
    )
    assert read_descriptor((("tenant", "acme"), ("rows", "many")), 1) is None
    assert read_descriptor((("tenant", ""),), 1) is None


def test_limits_files_are_checked() -> None:
    with pytest.raises(pydantic.ValidationError, match="carry a request's cost"):
        LimitsFile.model_validate(
            {"limits": [{"name": "x", "match": {"rows": "*"}, "limit": 1, "per": "second"}]}
        )
    with pytest.raises(pydantic.ValidationError, match="unique"):
        LimitsFile.model_validate(
            {"limits": [{"name": "x", "match": {"tenant": "*"}, "limit": 1, "per": "second"}] * 2}
        )
    shipped = LimitsFile.load(Path(__file__).parents[2] / "envoy" / "ratelimit.yaml")
    assert {limit.name for limit in shipped.limits} >= {"tenant-requests", "tenant-rows", "model-requests"}


async def test_counts_per_window_in_redis_until_over_limit(redis_url: str) -> None:
    now = NOW
    limiter = RateLimiter(
        LIMITS, RedisWindowCounters.connect(redis_url, timedelta(seconds=1)), clock=lambda: now
    )
    tenant = f"t-{uuid.uuid4().hex[:8]}"

    def cost(limit: str, unit: str) -> float:
        labels = {"limit": limit, "unit": unit}
        return REGISTRY.get_sample_value("tensorway_ratelimit_cost_total", labels) or 0

    rows_before = cost("tenant-rows", "rows")
    try:
        decisions = [await limiter.check("tensorway", [Descriptor((("tenant", tenant),))]) for _ in range(4)]
        assert [d.over_limit for d in decisions] == [False, False, False, True]
        assert [d.statuses[0].remaining for d in decisions] == [2, 1, 0, 0]
        assert decisions[3].retry_after == timedelta(seconds=60)
        # Rows count as hits against the rows limit only; other tenants have their own counters.
        rows = await limiter.check("tensorway", [Descriptor((("tenant", tenant), ("rows", "8")))])
        assert not rows.over_limit
        assert rows.statuses[0].remaining == 2
        assert cost("tenant-rows", "rows") == rows_before + 8
        other = await limiter.check("tensorway", [Descriptor((("tenant", f"{tenant}-b"),))])
        assert not other.over_limit
        # The next window starts from zero.
        now = NOW + 60
        assert not (await limiter.check("tensorway", [Descriptor((("tenant", tenant),))])).over_limit
        # Another domain is not this file's business.
        assert not (await limiter.check("elsewhere", [Descriptor((("tenant", tenant),))] * 9)).over_limit
    finally:
        await limiter.close()


@pytest.mark.parametrize(("mode", "rejected"), [("open", False), ("closed", True)])
async def test_redis_down_fails_as_configured(mode: str, rejected: bool) -> None:
    limits = LIMITS.model_copy(update={"redis_failure": RedisFailure(mode)})
    counters = RedisWindowCounters.connect(
        f"redis://127.0.0.1:{closed_port()}/0", timedelta(milliseconds=200)
    )
    limiter = RateLimiter(limits, counters, closed_retry_after=timedelta(seconds=2))
    try:
        for _ in range(2):  # the second answer comes from the outage backoff, without Redis
            decision = await limiter.check("tensorway", [Descriptor((("tenant", "acme"),))])
            assert decision.over_limit is rejected
            assert decision.retry_after == (timedelta(seconds=2) if rejected else None)
    finally:
        await limiter.close()


@pytest.fixture
async def rls(redis_url: str, tmp_path: Path) -> AsyncIterator[pb_grpc.RateLimitServiceStub]:
    limits = tmp_path / "limits.yaml"
    limits.write_text(
        "limits:\n  - {name: tenant-requests, match: {tenant: '*'}, limit: 2, per: hour}\n"
        "  - {name: tenant-bytes, match: {tenant: '*'}, cost: bytes, limit: 1000, per: hour}\n"
    )
    server, port = await create(Settings(redis_url=redis_url, limits_file=limits, metrics_enabled=False))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.RateLimitServiceStub(channel)
    finally:
        await server.stop(timedelta(0))


def descriptor(*entries: tuple[str, str]) -> pb.RateLimitDescriptor:
    return pb.RateLimitDescriptor(entries=[pb.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries])


async def test_should_rate_limit_answers_like_envoy_expects(rls: pb_grpc.RateLimitServiceStub) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    request = pb.RateLimitRequest(
        domain="tensorway",
        descriptors=[
            descriptor(("tenant", tenant)),
            descriptor(("tenant", tenant), ("bytes", "600")),
            descriptor(("x", "y")),
        ],
    )
    first = await rls.ShouldRateLimit(request, timeout=5)
    assert first.overall_code == pb.RateLimitResponse.OK
    assert [s.code for s in first.statuses] == [pb.RateLimitResponse.OK] * 3
    assert first.statuses[0].current_limit.name == "tenant-requests"
    assert first.statuses[0].current_limit.unit == pb.RateLimitResponse.RateLimit.HOUR
    assert first.statuses[1].limit_remaining == 400
    assert not first.statuses[2].HasField("current_limit")
    assert not first.response_headers_to_add

    second = await rls.ShouldRateLimit(request, timeout=5)
    assert second.overall_code == pb.RateLimitResponse.OVER_LIMIT
    assert [s.code for s in second.statuses] == [
        pb.RateLimitResponse.OK,
        pb.RateLimitResponse.OVER_LIMIT,
        pb.RateLimitResponse.OK,
    ]
    (header,) = second.response_headers_to_add
    assert header.key == "retry-after"
    assert 1 <= int(header.value) <= 3600

    # Envoy's own hits_addend: per request, overridden per descriptor.
    heavy = pb.RateLimitRequest(
        domain="tensorway", descriptors=[descriptor(("tenant", f"{tenant}-h"))], hits_addend=5
    )
    assert (await rls.ShouldRateLimit(heavy, timeout=5)).overall_code == pb.RateLimitResponse.OVER_LIMIT
    light = pb.RateLimitRequest(
        domain="tensorway", descriptors=[descriptor(("tenant", f"{tenant}-l"))], hits_addend=5
    )
    light.descriptors[0].hits_addend.value = 1
    assert (await rls.ShouldRateLimit(light, timeout=5)).overall_code == pb.RateLimitResponse.OK
