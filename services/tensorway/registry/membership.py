"""Pool membership: orchestrators that join their pool with a lease.

A pool's route endpoints are the ones set on it by hand (static, kept for pools that use them)
plus its members: orchestrators that called JoinPool and renew it by joining again before their
lease runs out. A member leaves at once with LeavePool (a graceful stop) or, when it dies, once
its lease expires: every registry replica sweeps expired members every `sweep_interval`, and the
write that removes them changes the routes of the pool's models, so WatchRoutes tells the
routers. A dead orchestrator thus gets traffic for at most its lease plus one sweep interval,
and routers' breakers and retries cover that window.

Joining writes the registry, so it needs `models.write`, the orchestrators' internal identity,
as ReportModelStates does; the endpoint must lie where pool endpoints may (the allow-list).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from tensorway.registry.validation import ENDPOINT, EndpointAllowList, dns_label, raise_if
from tensorway.runtime import FieldViolation, TensorwayError

if TYPE_CHECKING:
    from tensorway.registry.core import Registry

logger = logging.getLogger(__name__)

MIN_LEASE = timedelta(seconds=1)
"""The shortest lease a member may ask for: shorter ones would expire between two heartbeats
of a loaded machine and make members flap."""
MAX_LEASE = timedelta(minutes=5)
"""The longest lease: a dead orchestrator keeps its share of traffic (failing) at most this long."""


def check_member(pool: str, endpoint: str, lease: timedelta, allow: EndpointAllowList) -> None:
    """A JoinPool request: the pool id, an endpoint where pools may live, a lease in bounds."""
    violations = dns_label(pool, "pool")
    match = ENDPOINT.fullmatch(endpoint)
    if match is None or not 0 < int(match["port"]) < 65536:
        violations.append(FieldViolation("endpoint", f"{endpoint!r} is not host:port"))
    else:
        refused = allow.refusal(match["host"])
        if refused is not None:
            violations.append(
                FieldViolation("endpoint", f"{endpoint!r} is not where a pool may live: {refused}")
            )
    if not MIN_LEASE <= lease <= MAX_LEASE:
        violations.append(
            FieldViolation(
                "lease_duration",
                f"from {MIN_LEASE.total_seconds():g} s to {MAX_LEASE.total_seconds():g} s",
            )
        )
    raise_if(violations, "pool membership")


class MemberSweep:
    """Removes pool members whose lease ran out, every `interval`, for as long as it runs.

    Every replica sweeps; the delete is one statement, so each expired member is removed (and
    announced) by exactly one of them.

    A registry that starts has likely been away (a restart), and a sweep that fails means
    PostgreSQL is: either way members could not renew, and their leases may have run out
    meanwhile. Sweeping at once would drop every live member of a pool, and its routes with
    them, until each joined again; so the next sweep waits `grace`, time for them to renew.
    """

    def __init__(self, registry: Registry, interval: timedelta, grace: timedelta) -> None:
        self._registry = registry
        self._interval = interval.total_seconds()
        self._grace = grace.total_seconds()

    async def run(self) -> None:
        await asyncio.sleep(self._grace)
        while True:
            try:
                await self._registry.expire_pool_members()
            except TensorwayError as error:
                logger.warning("sweeping expired pool members failed: %s", error)
                await asyncio.sleep(self._grace)
                continue
            await asyncio.sleep(self._interval)
