"""How the registry's store modules run their statements: each read on a connection of the
pool, or every statement of a write on its transaction's connection. Etags are row version
counters; an update names the version it read (`WHERE row_version = ...`), so a write that
lost a race is refused (ABORTED) instead of silently overwriting."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, LiteralString

from psycopg.rows import DictRow

from tensorway.runtime.postgres import Connection

MAX_PAGE_SIZE = 1000
"""The most items one page of a list call holds."""


def etag_of(row: Mapping[str, Any]) -> str:
    return str(row["row_version"])


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
