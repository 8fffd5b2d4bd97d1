"""Pools and their leased members in PostgreSQL: row mapping, reads at a revision, and the
writes of a transaction."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, LiteralString

from psycopg import errors
from psycopg.types.json import Jsonb

from tensorway.registry.domain import POOL, Page, Pool, Versioned
from tensorway.registry.rows import MAX_PAGE_SIZE, Rows, row_version, stored_from_row
from tensorway.runtime import FailedPrecondition
from tensorway.runtime.postgres import PageCursor


def pool_from_row(row: Mapping[str, Any]) -> Pool:
    return Pool(
        name=row["name"],
        endpoints=tuple(row["endpoints"]),
        **stored_from_row(row),
    )


class PoolReads(Rows):
    """Pools as the cache loads them, each with the revision it was read at."""

    async def get_pool(self, name: str) -> Versioned[Pool]:
        return await self._at_revision(
            "SELECT * FROM pools, registry_revision r WHERE name = %(name)s",
            {"name": name},
            (POOL, f"pools/{name}"),
            pool_from_row,
        )

    async def list_pools(self, page_size: int, page_token: str) -> Page[Pool]:
        cursor = PageCursor(page_size, page_token, json.dumps(["pools"]), max_page_size=MAX_PAGE_SIZE)
        return await self._page(
            "SELECT * FROM pools WHERE (%(after)s::text IS NULL OR name > %(after)s)"
            " ORDER BY name LIMIT %(limit)s",
            {},
            cursor,
            key="name",
            from_row=pool_from_row,
        )


class PoolWrites(Rows):
    """Pools and their members inside a write transaction."""

    async def get_pool(self, name: str, *, share_lock: bool = False) -> Pool:
        """The pool; with `share_lock`, it cannot change or go away until commit."""
        query: LiteralString = (
            "SELECT * FROM pools WHERE name = %(name)s FOR SHARE"
            if share_lock
            else "SELECT * FROM pools WHERE name = %(name)s"
        )
        return pool_from_row(await self._found(query, {"name": name}, (POOL, f"pools/{name}")))

    async def models_on_pool(self, pool: str) -> set[str]:
        rows = await self._all("SELECT DISTINCT model FROM deployments WHERE pool = %(pool)s", {"pool": pool})
        return {row["model"] for row in rows}

    async def insert_pool(self, pool: Pool) -> Pool:
        row = await self._inserted(
            "INSERT INTO pools (name, endpoints) VALUES (%(name)s, %(endpoints)s) RETURNING *",
            {"name": pool.name, "endpoints": Jsonb(list(pool.endpoints))},
            (POOL, f"pools/{pool.name}"),
        )
        return pool_from_row(row)

    async def update_pool(self, pool: Pool, read: Pool) -> Pool:
        row = await self._over_read(
            "UPDATE pools SET endpoints = %(endpoints)s, update_time = now(), row_version = row_version + 1"
            " WHERE name = %(name)s AND row_version = %(read)s RETURNING *",
            {"name": pool.name, "endpoints": Jsonb(list(pool.endpoints)), "read": row_version(read.etag)},
            f"pools/{pool.name}",
        )
        return pool_from_row(row)

    async def delete_pool(self, pool: Pool) -> None:
        try:
            await self._over_read(
                "DELETE FROM pools WHERE name = %(name)s AND row_version = %(read)s RETURNING name",
                {"name": pool.name, "read": row_version(pool.etag)},
                f"pools/{pool.name}",
            )
        except errors.ForeignKeyViolation as exc:
            raise FailedPrecondition(
                f"pools/{pool.name} serves deployments; delete or move them first"
            ) from exc

    async def join_pool(self, pool: str, endpoint: str, lease: timedelta) -> tuple[datetime, bool]:
        """Make `endpoint` a member of `pool` until `lease` from now (the database's clock);
        returns when it expires and whether it joined just now (rather than renewed)."""
        await self.get_pool(pool, share_lock=True)
        renewed = await self._one(
            "UPDATE pool_members SET expire_time = now() + %(lease)s"
            " WHERE pool = %(pool)s AND endpoint = %(endpoint)s RETURNING expire_time",
            {"pool": pool, "endpoint": endpoint, "lease": lease},
        )
        if renewed is not None:
            return renewed["expire_time"], False
        # Two joins of one endpoint at once: the later one renews what the first inserted.
        joined = await self._one(
            "INSERT INTO pool_members (pool, endpoint, expire_time)"
            " VALUES (%(pool)s, %(endpoint)s, now() + %(lease)s)"
            " ON CONFLICT (pool, endpoint) DO UPDATE SET expire_time = EXCLUDED.expire_time"
            " RETURNING expire_time",
            {"pool": pool, "endpoint": endpoint, "lease": lease},
        )
        assert joined is not None
        return joined["expire_time"], True

    async def leave_pool(self, pool: str, endpoint: str) -> bool:
        """Remove `endpoint` from `pool`'s members; returns whether it was one."""
        await self.get_pool(pool)
        row = await self._one(
            "DELETE FROM pool_members WHERE pool = %(pool)s AND endpoint = %(endpoint)s RETURNING pool",
            {"pool": pool, "endpoint": endpoint},
        )
        if row is not None:
            await self._forget_states_of_gone(pool, endpoint)
        return row is not None

    async def expire_pool_members(self) -> list[tuple[str, str]]:
        """Remove every member whose lease has run out; returns them as (pool, endpoint)."""
        rows = await self._all(
            "DELETE FROM pool_members WHERE expire_time < now() RETURNING pool, endpoint", {}
        )
        for row in rows:
            await self._forget_states_of_gone(row["pool"], row["endpoint"])
        return sorted((row["pool"], row["endpoint"]) for row in rows)

    async def _forget_states_of_gone(self, pool: str, endpoint: str) -> None:
        """A member that left no longer counts towards its versions' readiness, unless the pool
        also lists it by hand."""
        await self._execute(
            "DELETE FROM model_state_reporters r USING pools p WHERE p.name = r.pool"
            " AND r.pool = %(pool)s AND r.endpoint = %(endpoint)s AND NOT p.endpoints ? r.endpoint",
            {"pool": pool, "endpoint": endpoint},
        )
