"""The batch pipeline's Prometheus metrics: what the API process reads from PostgreSQL (jobs by
state, shards left) and what each worker does (shards, rows, time, how far behind the topic it is)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from tensorway.batch.domain import JobState
from tensorway.batch.job_store import JobStore

JOBS = Gauge("tensorway_batch_jobs", "Jobs by state, as PostgreSQL records them.", ["state"])
SHARDS_PENDING = Gauge(
    "tensorway_batch_shards_pending", "Shards published and not yet done (pending or leased)."
)
ROWS = Counter(
    "tensorway_batch_rows_total",
    "Rows a worker processed, by model and outcome (ok, failed).",
    ["model", "outcome"],
)
SHARDS = Counter(
    "tensorway_batch_shards_total",
    "Shard messages a worker handled, by outcome: done, failed (released to run again, or the job "
    "cannot run), duplicate (finished, cancelled or taken by another worker already), stopped "
    "(given back unfinished when the worker stopped), malformed (not a shard message).",
    ["outcome"],
)
SHARDS_RUNNING = Gauge(
    "tensorway_batch_shards_running",
    "Shard messages a worker is handling now, from receipt until its result is recorded or dropped.",
)
SHARD_SECONDS = Histogram(
    "tensorway_batch_shard_seconds",
    "Time a worker took for one shard, lease to result written, by model.",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
CONSUMER_LAG = Gauge(
    "tensorway_batch_consumer_lag_messages",
    "Messages between a worker's position in a partition it consumes and the partition's end.",
    ["topic", "partition"],
)


class JobCensus:
    """Counts jobs by state and shards left in PostgreSQL into the gauges; run by the API process
    every census interval, so every API replica reports the same, whole picture."""

    def __init__(self, store: JobStore) -> None:
        self._store = store

    async def refresh(self) -> bool:
        jobs, pending = await self._store.census()
        for state in JobState:
            JOBS.labels(state.value).set(jobs.get(state.value, 0))
        SHARDS_PENDING.set(pending)
        return False


@dataclass(frozen=True)
class PartitionPosition:
    """Where a worker stands in one partition it consumes."""

    topic: str
    partition: int
    position: int | None
    """The next offset the worker reads; None before it has one."""
    end: int | None
    """The partition's end (high watermark) as the last fetch saw it; None before a fetch."""


class ConsumerLag:
    """Sets the lag gauge for the partitions a worker holds, dropping those it gave up."""

    def __init__(self) -> None:
        self._reported: set[tuple[str, str]] = set()

    def report(self, positions: Iterable[PartitionPosition]) -> None:
        reported = set()
        for at in positions:
            if at.position is None or at.end is None:
                continue
            labels = (at.topic, str(at.partition))
            CONSUMER_LAG.labels(*labels).set(max(0, at.end - at.position))
            reported.add(labels)
        for labels in self._reported - reported:
            CONSUMER_LAG.remove(*labels)
        self._reported = reported
