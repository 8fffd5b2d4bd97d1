"""The ratelimit service: Envoy's `envoy.service.ratelimit.v3.RateLimitService` on Redis, with
the limits of a YAML file; `tensorway serve ratelimit` runs it."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic_settings import SettingsConfigDict

from tensorway.ratelimit.core import Decision, Descriptor, RateLimiter, RedisWindowCounters, Status
from tensorway.ratelimit.envoy import rls_pb2 as pb
from tensorway.ratelimit.envoy import rls_pb2_grpc as pb_grpc
from tensorway.ratelimit.limits import LimitsFile, Window
from tensorway.runtime import ServiceBinding, ServiceServer, ServiceSettings, create_server

SERVICE = pb.DESCRIPTOR.services_by_name["RateLimitService"]
UNITS = {
    Window.SECOND: pb.RateLimitResponse.RateLimit.SECOND,
    Window.MINUTE: pb.RateLimitResponse.RateLimit.MINUTE,
    Window.HOUR: pb.RateLimitResponse.RateLimit.HOUR,
    Window.DAY: pb.RateLimitResponse.RateLimit.DAY,
}


def default_limits_file() -> Path:
    """The repository's envoy/ratelimit.yaml, next to the Envoy config it goes with."""
    # services/tensorway/ratelimit/service.py -> the repository root is four levels up.
    return Path(__file__).resolve().parents[3] / "envoy" / "ratelimit.yaml"


class Settings(ServiceSettings):
    """The ratelimit service's settings, from TENSORWAY_RATELIMIT_* variables."""

    model_config = SettingsConfigDict(env_prefix="TENSORWAY_RATELIMIT_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis, where every replica keeps the shared counters."""
    limits_file: Path | None = None
    """The limits YAML; the repository's envoy/ratelimit.yaml when unset."""
    redis_timeout: timedelta = timedelta(milliseconds=100)
    """How long a Redis call may take before the file's redis_failure mode answers instead."""
    redis_outage_backoff: timedelta = timedelta(seconds=1)
    """After a Redis failure, how long to answer by the failure mode without asking Redis."""
    closed_retry_after: timedelta = timedelta(seconds=1)
    """The retry-after sent with rejections while Redis is down and the mode is closed."""


def descriptors_from_proto(request: pb.RateLimitRequest) -> list[Descriptor]:
    # Envoy's hits_addend 0 means 1; a descriptor's own hits_addend overrides the request's.
    default = request.hits_addend or 1
    return [
        Descriptor(
            entries=tuple((entry.key, entry.value) for entry in descriptor.entries),
            hits=descriptor.hits_addend.value if descriptor.HasField("hits_addend") else default,
        )
        for descriptor in request.descriptors
    ]


def status_to_proto(status: Status) -> pb.RateLimitResponse.DescriptorStatus:
    code = pb.RateLimitResponse.OVER_LIMIT if status.over_limit else pb.RateLimitResponse.OK
    if status.limit is None:
        return pb.RateLimitResponse.DescriptorStatus(code=code)
    proto = pb.RateLimitResponse.DescriptorStatus(
        code=code,
        current_limit=pb.RateLimitResponse.RateLimit(
            name=status.limit.name, requests_per_unit=status.limit.limit, unit=UNITS[status.limit.per]
        ),
        limit_remaining=status.remaining,
    )
    proto.duration_until_reset.FromTimedelta(status.reset_in)
    return proto


def decision_to_proto(decision: Decision) -> pb.RateLimitResponse:
    response = pb.RateLimitResponse(
        overall_code=pb.RateLimitResponse.OVER_LIMIT if decision.over_limit else pb.RateLimitResponse.OK,
        statuses=[status_to_proto(status) for status in decision.statuses],
    )
    if decision.retry_after is not None:
        seconds = max(1, math.ceil(decision.retry_after.total_seconds()))
        response.response_headers_to_add.add(key="retry-after", value=str(seconds))
    return response


class RateLimitServicer(pb_grpc.RateLimitServiceServicer):
    """RateLimitService over gRPC: convert, ask the limiter, convert back."""

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def ShouldRateLimit(self, request: pb.RateLimitRequest, context: Any) -> pb.RateLimitResponse:
        decision = await self._limiter.check(request.domain, descriptors_from_proto(request))
        return decision_to_proto(decision)


async def create(settings: Settings) -> tuple[ServiceServer, int]:
    """The ratelimit server, not yet started, and its port."""
    limits = LimitsFile.load(settings.limits_file or default_limits_file())
    limiter = RateLimiter(
        limits,
        RedisWindowCounters.connect(settings.redis_url, settings.redis_timeout),
        closed_retry_after=settings.closed_retry_after,
        outage_backoff=settings.redis_outage_backoff,
    )
    try:
        server, port = create_server(
            "ratelimit",
            settings,
            [
                ServiceBinding(
                    pb_grpc.add_RateLimitServiceServicer_to_server, RateLimitServicer(limiter), SERVICE
                )
            ],
        )
    except BaseException:
        await limiter.close()
        raise
    server.on_stop(limiter.close)
    return server, port
