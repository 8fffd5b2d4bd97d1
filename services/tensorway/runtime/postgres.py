"""PostgreSQL plumbing the services that keep their truth there share: a connection pool that
checks connections and is renewed after an outage, versioned migrations, a LISTEN helper, page
tokens bound to the query they page, and the `key=value AND ...` filter syntax of list calls.

A service keeps its own SQL, row mappers and schema; this module only holds how they are run.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, LiteralString

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from tensorway.runtime.errors import FieldViolation, InvalidArgument, Unavailable

logger = logging.getLogger(__name__)

Connection = AsyncConnection[DictRow]


# --- migrations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One step of a schema. Never edit a released one: add the next."""

    version: int
    name: str
    statements: tuple[LiteralString, ...]


@dataclass(frozen=True)
class Schema:
    """A service's tables: its migrations, applied once each and in order, recorded in
    `record_table`. `lock_key` serializes replicas that start together; any constant works, as
    long as every replica of the service uses the same and other services another."""

    record_table: str
    lock_key: int
    migrations: tuple[Migration, ...]


async def migrate(connection: Connection, schema: Schema) -> list[int]:
    """Apply the migrations this database lacks, in one transaction; returns the versions applied."""
    applied_now = []
    record = sql.Identifier(schema.record_table)
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(%s)", (schema.lock_key,))
        await connection.execute(
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {} (
                    version integer PRIMARY KEY,
                    name text NOT NULL DEFAULT '',
                    applied_at timestamptz NOT NULL DEFAULT now()
                )"""
            ).format(record)
        )
        # Records made before migrations had names have no such column.
        await connection.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS name text NOT NULL DEFAULT ''").format(record)
        )
        cursor = await connection.execute(sql.SQL("SELECT version FROM {}").format(record))
        applied = {row["version"] for row in await cursor.fetchall()}
        for migration in schema.migrations:
            if migration.version in applied:
                continue
            for statement in migration.statements:
                await connection.execute(statement)
            await connection.execute(
                sql.SQL("INSERT INTO {} (version, name) VALUES (%s, %s)").format(record),
                (migration.version, migration.name),
            )
            applied_now.append(migration.version)
    return applied_now


# --- the pool -----------------------------------------------------------------------------------


class Database:
    """A service's PostgreSQL through a connection pool: each connection is checked before a
    call gets it, and after an outage the pool is renewed whole (its connections died with the
    server, and it may sleep in a reconnect backoff that doubles up to minutes). A call that
    cannot reach PostgreSQL fails UNAVAILABLE with `retry_after`."""

    def __init__(self, url: str, *, size: int, wait: timedelta, retry_after: timedelta, what: str) -> None:
        self.url = url
        self._size = size
        self._wait = wait
        self._retry_after = retry_after
        self._what = what
        self._pool = self._new_pool()
        self.reachable = True
        """False since a call could not reach PostgreSQL, until one succeeds again."""

    @classmethod
    async def open(
        cls, url: str, schema: Schema, *, size: int, wait: timedelta, retry_after: timedelta, what: str
    ) -> Database:
        """Connect, waiting up to `wait`, and bring `schema` up to date (safe from several
        processes at once). `what` names the database in errors: "the batch database"."""
        database = cls(url, size=size, wait=wait, retry_after=retry_after, what=what)
        try:
            await database._pool.open(wait=True, timeout=wait.total_seconds())
            async with database._pool.connection() as connection:
                applied = await migrate(connection, schema)
        except BaseException:
            # Nothing else holds the pool yet: a failed open must not leave its workers behind.
            await database.close()
            raise
        if applied:
            logger.info("schema migrated", extra={"table": schema.record_table, "versions": applied})
        return database

    def _new_pool(self) -> AsyncConnectionPool[Connection]:
        return AsyncConnectionPool(
            self.url,
            connection_class=AsyncConnection[DictRow],
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "connect_timeout": max(1, int(self._wait.total_seconds())),
            },
            min_size=1,
            max_size=self._size,
            timeout=self._wait.total_seconds(),
            check=AsyncConnectionPool.check_connection,
            open=False,
        )

    async def renew(self) -> None:
        """Replace the pool; connections still in use close as they are returned."""
        old, self._pool = self._pool, self._new_pool()
        await self._pool.open(wait=False)
        await old.close()

    async def close(self) -> None:
        await self._pool.close()

    def unavailable(self, exc: BaseException) -> Unavailable:
        """The error a call gets when PostgreSQL cannot be reached."""
        self.reachable = False
        logger.warning("PostgreSQL unreachable: %s", exc)
        return Unavailable(f"{self._what} is unreachable; retry", retry_after=self._retry_after)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A connection of the pool, in autocommit."""
        try:
            async with self._pool.connection() as connection:
                yield connection
        except psycopg.OperationalError as exc:
            raise self.unavailable(exc) from exc
        self.reachable = True

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A connection in a transaction, committed when the block ends without an error."""
        async with self.connection() as connection, connection.transaction():
            yield connection

    async def notifications(
        self, channel: LiteralString, reconnect_delay: timedelta
    ) -> AsyncIterator[str | None]:
        """The payload of every NOTIFY on `channel`, for as long as the caller iterates, on a
        connection of its own. None after each (re)connection: what was sent while nobody
        listened was missed, so the caller looks again. A lost connection is made again after
        `reconnect_delay`; when PostgreSQL comes back after an outage, the pool is renewed."""
        while True:
            try:
                connection = await AsyncConnection.connect(
                    self.url,
                    autocommit=True,
                    connect_timeout=max(1, int(reconnect_delay.total_seconds() * 4)),
                )
                async with connection:
                    await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    if not self.reachable:
                        await self.renew()
                        self.reachable = True
                    yield None
                    async for notify in connection.notifies():
                        yield notify.payload
            except (psycopg.Error, OSError) as exc:
                if self.reachable:
                    self.unavailable(exc)
            await asyncio.sleep(reconnect_delay.total_seconds())


# --- page tokens --------------------------------------------------------------------------------

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_TOKEN = 512
MAX_PAGE_KEY = 256
MAX_SEQ = 2**63 - 1


def _bad_page_token(why: str) -> InvalidArgument:
    return InvalidArgument(
        f"bad page_token: {why}", [FieldViolation("page_token", "not a token this list returned")]
    )


def storable(text: str) -> bool:
    """Whether PostgreSQL text can hold it: no NUL, no lone surrogate."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\0" not in text


class PageCursor:
    """Where a list continues: an opaque token of the last key and the query it belongs to.

    `query` says what is listed: the collection, its parent, the caller's tenant where lists
    are per tenant, and the filter, e.g. json.dumps(["jobs", tenant, sorted(terms.items())]).
    A token is base64 JSON of the key and a digest of that query, so it stays small whatever
    the filter. Anything that is not a token this very query returned (broken base64, other
    JSON, a key of the wrong type or range, a token of another list, tenant or filter) is
    INVALID_ARGUMENT, before a query could run with it.
    """

    def __init__(
        self,
        page_size: int,
        page_token: str,
        query: str,
        key: type[str] | type[int] = str,
        *,
        max_page_size: int,
        default_page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if page_size < 0:
            raise InvalidArgument("page_size is negative", [FieldViolation("page_size", "0 or more")])
        self.limit = min(page_size or default_page_size, max_page_size)
        self.query = hashlib.sha256(query.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        self.key = key
        self.after: str | int | None = None
        if page_token:
            self.after = self._parse(page_token)

    def _parse(self, page_token: str) -> str | int:
        if len(page_token) > MAX_PAGE_TOKEN:
            raise _bad_page_token("too long")
        try:
            token = json.loads(base64.b64decode(page_token.encode("ascii"), altchars=b"-_", validate=True))
        except (binascii.Error, ValueError, RecursionError) as exc:  # UnicodeError is a ValueError
            raise _bad_page_token("not base64 JSON") from exc
        if not isinstance(token, dict) or set(token) != {"after", "query"}:
            raise _bad_page_token("not a page token")
        if token["query"] != self.query:
            raise InvalidArgument(
                "page_token belongs to another query",
                [FieldViolation("page_token", "send the same parent and filter as the first page")],
            )
        after: object = token["after"]
        if self.key is int:
            if isinstance(after, int) and not isinstance(after, bool) and 0 <= after <= MAX_SEQ:
                return after
        elif isinstance(after, str) and 0 < len(after) <= MAX_PAGE_KEY and storable(after):
            return after
        raise _bad_page_token("not a position in this list")

    def page(self, rows: Sequence[Mapping[str, Any]], key: str) -> tuple[Sequence[Mapping[str, Any]], str]:
        """The rows of this page (the query fetched one more than `limit`) and the next token."""
        if len(rows) <= self.limit:
            return rows, ""
        rows = rows[: self.limit]
        token = json.dumps({"after": rows[-1][key], "query": self.query}).encode()
        return rows, base64.urlsafe_b64encode(token).decode()


# --- filters ------------------------------------------------------------------------------------

# A value is a word, or a double-quoted string that may hold spaces (AIP-160's string literal).
FILTER_TERM = re.compile(r'\s*(?P<key>[^=\s]+)\s*=\s*(?:"(?P<quoted>[^"]*)"|(?P<value>\S*))\s*')


def parse_filter_terms(text: str) -> list[tuple[str, str]]:
    """`key=value` terms joined by " AND ", in order; anything else is INVALID_ARGUMENT on
    `filter`. Which keys and values a list takes is its own to check."""
    if not text.strip():
        return []
    terms = []
    for term in re.split(r"\s+AND\s+", text.strip()):
        match = FILTER_TERM.fullmatch(term)
        if match is None:
            raise InvalidArgument(
                f"bad filter term {term!r}",
                [FieldViolation("filter", f"{term!r} is not key=value (terms joined by AND)")],
            )
        quoted = match["quoted"]
        terms.append((match["key"], quoted if quoted is not None else match["value"]))
    return terms
