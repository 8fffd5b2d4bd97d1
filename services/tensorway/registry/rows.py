"""How the registry's store modules run their statements: each read on a connection of the
pool, or every statement of a write on its transaction's connection. Etags are row version
counters; an update names the version it read (`WHERE row_version = ...`), so a write that
lost a race is refused (ABORTED) instead of silently overwriting.

What every resource table shares is here once: a row or NOT_FOUND (`_found`, `_at_revision`),
an insert or ALREADY_EXISTS (`_inserted`), a write over the etag read or ABORTED
(`_over_read`), a page of a list (`_page`), and the `Stored` fields of a row."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, LiteralString, TypeVar

from psycopg import errors
from psycopg.rows import DictRow

from tensorway.registry.domain import Page, Versioned
from tensorway.runtime import Aborted, AlreadyExists, NotFound
from tensorway.runtime.postgres import Connection, PageCursor

T = TypeVar("T")
Params = Mapping[str, Any]
FromRow = Callable[[Mapping[str, Any]], T]
"""How a row becomes a domain value."""
Resource = tuple[str, str]
"""A resource as errors name it: its type and its name."""

MAX_PAGE_SIZE = 1000
"""The most items one page of a list call holds."""


def etag_of(row: Mapping[str, Any]) -> str:
    return str(row["row_version"])


def stored_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The `Stored` fields of a row (a partial row may lack them)."""
    return {
        "create_time": row.get("create_time"),
        "update_time": row.get("update_time"),
        "etag": etag_of(row) if "row_version" in row else "",
    }


def row_version(etag: str) -> int:
    return int(etag)


class Rows(ABC):
    """Runs statements on `_connection()`: the store's pool, or a write's transaction."""

    @abstractmethod
    def _connection(self) -> AbstractAsyncContextManager[Connection]: ...

    async def _one(self, query: LiteralString, params: Mapping[str, Any]) -> DictRow | None:
        async with self._connection() as connection:
            cursor = await connection.execute(query, params)
            return await cursor.fetchone()

    async def _all(self, query: LiteralString, params: Mapping[str, Any]) -> list[DictRow]:
        async with self._connection() as connection:
            cursor = await connection.execute(query, params)
            return await cursor.fetchall()

    async def _execute(self, query: LiteralString, params: Mapping[str, Any]) -> None:
        async with self._connection() as connection:
            await connection.execute(query, params)

    async def _found(self, query: LiteralString, params: Params, missing: Resource) -> DictRow:
        """The row `query` finds; NOT_FOUND for the `missing` resource when there is none."""
        row = await self._one(query, params)
        if row is None:
            raise NotFound(*missing)
        return row

    async def _at_revision(
        self, query: LiteralString, params: Params, missing: Resource, from_row: FromRow[T]
    ) -> Versioned[T]:
        """What `query` finds joined with `registry_revision`, and the revision it was read at."""
        row = await self._found(query, params, missing)
        return Versioned(from_row(row), row["revision"])

    async def _inserted(self, query: LiteralString, params: Params, taken: Resource) -> DictRow:
        """The row an INSERT ... RETURNING made; ALREADY_EXISTS for the `taken` resource when
        its key is."""
        try:
            row = await self._one(query, params)
        except errors.UniqueViolation as exc:
            raise AlreadyExists(*taken) from exc
        assert row is not None
        return row

    async def _over_read(self, query: LiteralString, params: Params, name: str) -> DictRow:
        """The row an UPDATE or DELETE ... RETURNING changed where the row version was the one
        read (`etag`); ABORTED when another write came first."""
        row = await self._one(query, params)
        if row is None:
            raise Aborted(f"{name} changed meanwhile; read it again")
        return row

    async def _page(
        self,
        query: LiteralString,
        params: Params,
        cursor: PageCursor,
        *,
        key: str,
        from_row: FromRow[T],
        parent: Callable[[], Awaitable[object]] | None = None,
    ) -> Page[T]:
        """One page of a list whose `query` takes `after` and `limit` besides `params`. An empty
        first page reads the `parent`, so an unknown parent is NOT_FOUND, not an empty list."""
        rows = await self._all(query, {**params, "after": cursor.after, "limit": cursor.limit + 1})
        if parent is not None and not rows and cursor.after is None:
            await parent()
        page, token = cursor.page(rows, key)
        return Page([from_row(row) for row in page], token)
