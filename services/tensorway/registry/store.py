"""PostgreSQL, the registry's truth: the store the core reads through, its write transactions
and change notifications. What each aggregate reads and writes is in its own module
(`model_store`, `pool_store`, `readiness_store`, `deployment_store`, `route_store`); this one
puts them together over one connection pool.

Every committed write increases the one registry revision inside its transaction and sends a
NOTIFY with it, so commits, revisions and notifications come in the same order.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from datetime import timedelta
from typing import LiteralString

from tensorway.registry import migrations
from tensorway.registry.deployment_store import DeploymentReads, DeploymentWrites
from tensorway.registry.domain import DEFAULT_MIN_READY_SHARE, Change
from tensorway.registry.model_store import ModelReads, ModelWrites
from tensorway.registry.pool_store import PoolReads, PoolWrites
from tensorway.registry.readiness_store import ReadinessWrites
from tensorway.registry.route_store import RouteReads
from tensorway.runtime.postgres import Connection, Database

CHANGES_CHANNEL: LiteralString = "tensorway_registry_changes"
# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more; a change naming more models than
# fit is sent as several notifications with the same revision.
MAX_NOTIFY_BYTES = 7000


async def open_database(url: str, *, size: int, wait: timedelta, retry_after: timedelta) -> Database:
    """A pool of `size` connections to the registry's database, its schema brought up to date."""
    return await Database.open(
        url, migrations.SCHEMA, size=size, wait=wait, retry_after=retry_after, what="the registry's database"
    )


class RegistryStore(DeploymentReads, ModelReads, PoolReads, RouteReads):
    """The registry's tables in PostgreSQL, through a connection pool. Each read runs on a
    connection of its own and returns the revision it read at, which the cache keeps with the
    value; `write` gives a transaction."""

    def __init__(self, database: Database, min_ready_share: float = DEFAULT_MIN_READY_SHARE) -> None:
        self.database = database
        self.min_ready_share = min_ready_share

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int,
        wait: timedelta,
        retry_after: timedelta,
        min_ready_share: float = DEFAULT_MIN_READY_SHARE,
    ) -> RegistryStore:
        """Connect, and bring the schema up to date. A call waits up to `wait` for a
        connection before it fails UNAVAILABLE. `min_ready_share` is the share of a pool's
        endpoints that must have a version ready before its route gives it traffic."""
        database = await open_database(url, size=pool_size, wait=wait, retry_after=retry_after)
        return cls(database, min_ready_share)

    async def close(self) -> None:
        await self.database.close()

    def _connection(self) -> AbstractAsyncContextManager[Connection]:
        return self.database.connection()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Writer]:
        """A write transaction. What it `touch`es is committed with a new revision and a NOTIFY;
        `writer.change` holds them after the block. PostgreSQL down gives UNAVAILABLE."""
        async with self.database.transaction() as connection:
            writer = Writer(connection)
            yield writer
            await writer.commit_change()

    async def changes(self, reconnect_delay: timedelta) -> AsyncIterator[Change | None]:
        """Every committed change, from LISTEN, for as long as the caller iterates.

        Yields None after each (re)connection: changes made while disconnected were missed,
        so the caller reloads what it keeps. Reconnects after `reconnect_delay` on failure.
        """
        async for payload in self.database.notifications(CHANGES_CHANNEL, reconnect_delay):
            yield None if payload is None else change_from_json(payload)


def change_to_json(change: Change, models: Iterable[str] | None = None) -> str:
    return json.dumps(
        {"revision": change.revision, "models": sorted(change.models if models is None else models)}
    )


def change_from_json(payload: str | bytes) -> Change:
    data = json.loads(payload)
    return Change(revision=int(data["revision"]), models=frozenset(data["models"]), keys=frozenset())


class Writer(ModelWrites, DeploymentWrites, ReadinessWrites, PoolWrites):
    """Reads and writes inside one transaction. Core code records what changed with `touch`."""

    def __init__(self, connection: Connection) -> None:
        self._transaction = connection
        self._models: set[str] = set()
        self._keys: set[str] = set()
        self.change: Change | None = None
        """The committed change; set once the transaction has its revision."""

    def _connection(self) -> AbstractAsyncContextManager[Connection]:
        return nullcontext(self._transaction)

    def touch(self, models: Iterable[str] = (), keys: Iterable[str] = ()) -> None:
        """Record that routes of `models` may have changed and that cache `keys` are stale."""
        self._models.update(models)
        self._keys.update(keys)

    async def commit_change(self) -> None:
        if not (self._models or self._keys):
            return
        row = await self._one("UPDATE registry_revision SET revision = revision + 1 RETURNING revision", {})
        assert row is not None
        self.change = Change(row["revision"], frozenset(self._models), frozenset(self._keys))
        for chunk in _notify_chunks(sorted(self._models)):
            await self._transaction.execute(
                "SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, change_to_json(self.change, chunk))
            )


def _notify_chunks(models: Sequence[str]) -> Iterable[Sequence[str]]:
    """The models split so each notification's payload stays under PostgreSQL's limit."""
    chunk: list[str] = []
    size = 0
    for model in models:
        if chunk and size + len(model) + 4 > MAX_NOTIFY_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(model)
        size += len(model) + 4
    yield chunk
