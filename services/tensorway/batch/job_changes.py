"""Notifications of job changes from PostgreSQL, which wake WatchJob's watchers and the
outbox relay sooner than their own looks would."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from tensorway.batch.migrations import JOB_CHANGES_CHANNEL
from tensorway.runtime.postgres import Database


class JobChanges:
    """Wakes the watchers of a job when its row changes, from the notifications PostgreSQL
    sends on every update of a job. Watchers still look on their own at their interval, so a
    lost connection only makes them slower until it is back."""

    name = "job changes"

    def __init__(
        self, database: Database, retry_after: timedelta, on_any_change: Callable[[], None] | None = None
    ) -> None:
        self._database = database
        self._retry_after = retry_after
        self._on_any_change = on_any_change
        self._waiters: dict[str, set[asyncio.Event]] = {}

    @contextmanager
    def watching(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever the job changes, for as long as the block runs."""
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters[job_id]
            waiters.discard(event)
            if not waiters:
                del self._waiters[job_id]

    async def run(self) -> None:
        """Listen until cancelled, connecting again after a failure."""
        async for job_id in self._database.notifications(JOB_CHANGES_CHANNEL, self._retry_after):
            if job_id is None:
                # What changed while nobody listened is seen by looking again.
                for waiters in self._waiters.values():
                    for event in waiters:
                        event.set()
                continue
            for event in self._waiters.get(job_id, ()):
                event.set()
            if self._on_any_change is not None:
                self._on_any_change()
