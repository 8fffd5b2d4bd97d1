"""What this router answered per model version, reported to the registry (ReportTraffic) for
the measured rollouts it judges, so the registry needs no Prometheus of its own.

The figures are read from the router's own metrics (`metrics.ROUTED`, `REQUEST_SECONDS`,
`SHADOW`), so the request path does no extra work: every `interval`, the reporter sends what
the counters gained since its last report. A version's requests are its answers that were OK
or a server fault; client faults and neutral codes (`breaker.CLIENT_FAULTS`, `NEUTRAL`) never
count against a version, as they never count against an endpoint. A model's own error answer
does: it is exactly what a bad version does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta

import grpc

from tensorway.registry.access import admin_metadata
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.registry.v1 import registry_service_pb2_grpc as registry_grpc
from tensorway.router import metrics
from tensorway.router.breaker import CLIENT_FAULTS, NEUTRAL
from tensorway.runtime import create_channel

logger = logging.getLogger(__name__)

_NOT_COUNTED = frozenset(code.name for code in CLIENT_FAULTS | NEUTRAL)
_OK = grpc.StatusCode.OK.name
ROUTER_TENANT = "router"
"""The identity of the routers' reports: the mesh's internal writer, as orchestrators' are."""


COUNTERS = ("requests", "server_errors", "shadow_matches", "shadow_mismatches")
"""What a report counts of each version, named as VersionTraffic's fields."""


@dataclass
class VersionTotals:
    """Cumulative figures of one model version, as the metrics hold them."""

    counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0.0))
    """Each of the COUNTERS so far."""
    buckets: dict[float, float] = field(default_factory=dict)
    """Cumulative answers at or below each latency bound (Prometheus' `le`)."""


# The shadow comparisons' outcomes a report counts, and where.
_SHADOW_COUNTERS = {"match": "shadow_matches", "mismatch": "shadow_mismatches"}


def read_totals() -> dict[tuple[str, str], VersionTotals]:
    """Every model version's figures from this process's router metrics."""
    totals: dict[tuple[str, str], VersionTotals] = defaultdict(VersionTotals)
    for family in metrics.ROUTED.collect():
        for sample in family.samples:
            code = sample.labels["grpc_code"]
            if not sample.name.endswith("_total") or code in _NOT_COUNTED:
                continue
            counts = totals[(sample.labels["model"], sample.labels["version"])].counts
            counts["requests"] += sample.value
            if code != _OK:
                counts["server_errors"] += sample.value
    for family in metrics.REQUEST_SECONDS.collect():
        for sample in family.samples:
            if not sample.name.endswith("_bucket") or sample.labels["grpc_code"] in _NOT_COUNTED:
                continue
            buckets = totals[(sample.labels["model"], sample.labels["version"])].buckets
            bound = float(sample.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + sample.value
    for family in metrics.SHADOW.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            counter = _SHADOW_COUNTERS.get(sample.labels["outcome"])
            if counter is not None:
                totals[(sample.labels["model"], sample.labels["version"])].counts[counter] += sample.value
    return dict(totals)


def gained(
    now: dict[tuple[str, str], VersionTotals], before: dict[tuple[str, str], VersionTotals]
) -> list[registry_pb.VersionTraffic]:
    """What each version gained between two readings, for the versions that gained anything."""
    reports = []
    for (model, version), current in sorted(now.items()):
        last = before.get((model, version), VersionTotals())
        bounds = sorted(current.buckets)
        cumulative = [current.buckets[b] - last.buckets.get(b, 0.0) for b in bounds]
        counts = [int(c - p) for c, p in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]
        report = registry_pb.VersionTraffic(
            model=model,
            version=version,
            latency_bounds=bounds,
            latency_counts=counts,
            **{name: int(current.counts[name] - last.counts[name]) for name in COUNTERS},
        )
        if report.requests or report.shadow_matches or report.shadow_mismatches:
            reports.append(report)
    return reports


class TrafficReporter:
    """Sends the registry what this router answered per model version, every `interval`.

    A report that fails is not lost: the next one carries what it would have, since each
    report is the difference from the last one the registry took."""

    def __init__(
        self,
        registry_address: str,
        router: str,
        interval: timedelta,
        timeout: timedelta = timedelta(seconds=5),
    ) -> None:
        self._channel = create_channel(registry_address)
        self._stub = registry_grpc.RegistryServiceStub(self._channel)
        self._router = router
        self._interval = interval.total_seconds()
        self._timeout = timeout.total_seconds()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # A task of its own: it lives as long as the server, which stops it in `stop`.
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        reported = read_totals()
        while True:
            await asyncio.sleep(self._interval)
            totals = read_totals()
            versions = gained(totals, reported)
            if not versions:
                reported = totals
                continue
            try:
                await self._stub.ReportTraffic(
                    registry_pb.ReportTrafficRequest(router=self._router, versions=versions),
                    timeout=self._timeout,
                    metadata=admin_metadata(ROUTER_TENANT),
                )
            except grpc.aio.AioRpcError as error:
                logger.warning(
                    "reporting traffic to the registry failed: %s", error.details() or error.code()
                )
                continue
            reported = totals

    async def stop(self) -> None:
        """Stop reporting and close the channel. Safe to call twice."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._channel.close()
