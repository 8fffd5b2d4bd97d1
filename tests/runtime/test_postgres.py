"""The shared PostgreSQL plumbing on a real PostgreSQL: migrations, the pool and its errors,
LISTEN, page tokens bound to their query, and the filter syntax."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql

from tensorway.runtime import InvalidArgument, Unavailable
from tensorway.runtime.postgres import Database, Migration, PageCursor, Schema, migrate, parse_filter_terms
from tests.waiting import eventually

SCHEMA = Schema(
    record_table="things_schema_migrations",
    lock_key=0x74772D7465737473,
    migrations=(
        Migration(1, "things", ("CREATE TABLE things (id integer PRIMARY KEY, name text NOT NULL)",)),
        Migration(2, "things have colours", ("ALTER TABLE things ADD COLUMN colour text",)),
    ),
)
SECOND = timedelta(seconds=1)


@pytest.fixture
async def database_url(postgres_url: str) -> AsyncIterator[str]:
    """A database of this test's own."""
    name = f"runtime_{uuid.uuid4().hex[:8]}"
    admin_url = postgres_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    opened = await Database.open(
        database_url, SCHEMA, size=3, wait=5 * SECOND, retry_after=SECOND, what="things"
    )
    yield opened
    await opened.close()


async def test_migrations_apply_once_in_order_even_from_two_processes_at_once(database_url: str) -> None:
    async def migrate_once() -> list[int]:
        async with await psycopg.AsyncConnection.connect(
            database_url, autocommit=True, row_factory=psycopg.rows.dict_row
        ) as connection:
            return await migrate(connection, SCHEMA)

    first, second = await asyncio.gather(migrate_once(), migrate_once())
    assert sorted([first, second]) == [[], [1, 2]]
    assert await migrate_once() == []
    with psycopg.connect(database_url) as connection:
        recorded = connection.execute("SELECT version, name FROM things_schema_migrations ORDER BY version")
        assert recorded.fetchall() == [(1, "things"), (2, "things have colours")]
        connection.execute("INSERT INTO things (id, name, colour) VALUES (1, 'a', 'red')")


async def test_a_record_table_from_before_migration_names_is_taken_over(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE things_schema_migrations (version integer PRIMARY KEY)")
        connection.execute("CREATE TABLE things (id integer PRIMARY KEY, name text NOT NULL)")
        connection.execute("INSERT INTO things_schema_migrations (version) VALUES (1)")
    async with await psycopg.AsyncConnection.connect(
        database_url, autocommit=True, row_factory=psycopg.rows.dict_row
    ) as connection:
        assert await migrate(connection, SCHEMA) == [2]


async def test_a_transaction_commits_only_when_its_block_ends_without_an_error(database: Database) -> None:
    async with database.transaction() as connection:
        await connection.execute("INSERT INTO things (id, name) VALUES (1, 'kept')")

    async def change_of_mind() -> None:
        async with database.transaction() as connection:
            await connection.execute("INSERT INTO things (id, name) VALUES (2, 'dropped')")
            raise RuntimeError("the caller changed its mind")

    with pytest.raises(RuntimeError):
        await change_of_mind()
    async with database.connection() as connection:
        cursor = await connection.execute("SELECT name FROM things ORDER BY id")
        assert [row["name"] for row in await cursor.fetchall()] == ["kept"]


async def test_postgresql_out_of_reach_is_unavailable_with_retry_after() -> None:
    unreachable = Database(
        "postgresql://postgres@127.0.0.1:9/none",
        size=1,
        wait=SECOND,
        retry_after=3 * SECOND,
        what="the things",
    )
    try:
        with pytest.raises(Unavailable) as raised:
            async with unreachable.transaction():
                pass
        assert "the things is unreachable" in str(raised.value)
        assert raised.value.retry_after == 3 * SECOND
        assert not unreachable.reachable
    finally:
        await unreachable.close()


async def test_notifications_start_with_a_look_again_then_carry_each_payload(database: Database) -> None:
    received: list[str | None] = []

    async def listen() -> None:
        async for payload in database.notifications("things_changed", SECOND):
            received.append(payload)

    listening = asyncio.create_task(listen())
    try:
        await eventually(lambda: received == [None], what="the first connection")
        async with database.connection() as connection:
            await connection.execute("SELECT pg_notify('things_changed', 'thing-1')")
            await connection.execute("SELECT pg_notify('other_channel', 'not ours')")
            await connection.execute("SELECT pg_notify('things_changed', 'thing-2')")
        await eventually(lambda: received == [None, "thing-1", "thing-2"], what="both payloads")
    finally:
        listening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listening


def test_a_page_token_continues_its_own_query_only() -> None:
    query = json.dumps(["jobs", "acme", [["model", "digits"]]])
    first = PageCursor(2, "", query, int, max_page_size=10)
    rows, token = first.page([{"seq": 9}, {"seq": 7}, {"seq": 5}], "seq")
    assert [row["seq"] for row in rows] == [9, 7]
    assert token
    assert PageCursor(2, token, query, int, max_page_size=10).after == 7
    # The last page has no next token.
    assert PageCursor(2, token, query, int, max_page_size=10).page([{"seq": 5}], "seq")[1] == ""
    for other in (json.dumps(["jobs", "globex", [["model", "digits"]]]), json.dumps(["jobs", "acme", []])):
        with pytest.raises(InvalidArgument, match="another query"):
            PageCursor(2, token, other, int, max_page_size=10)


@pytest.mark.parametrize(
    "after",
    [-1, 2**63, True, "7", 7.5, None],
)
def test_a_forged_position_with_the_right_query_is_invalid_argument(after: object) -> None:
    query = json.dumps(["jobs", "acme", []])
    digest = PageCursor(1, "", query, int, max_page_size=10).query
    forged = base64.urlsafe_b64encode(json.dumps({"after": after, "query": digest}).encode()).decode()
    with pytest.raises(InvalidArgument, match="not a position"):
        PageCursor(1, forged, query, int, max_page_size=10)


@pytest.mark.parametrize("token", ["not a token", "%%%", "A" * 5000, base64.b64encode(b"[1, 2]").decode()])
def test_what_is_no_page_token_is_invalid_argument(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        PageCursor(1, token, "[]", int, max_page_size=10)


def test_page_sizes_default_and_are_capped_and_never_negative() -> None:
    assert PageCursor(0, "", "[]", max_page_size=10, default_page_size=4).limit == 4
    assert PageCursor(99, "", "[]", max_page_size=10).limit == 10
    with pytest.raises(InvalidArgument, match="page_size"):
        PageCursor(-1, "", "[]", max_page_size=10)


def test_filter_terms_are_key_value_pairs_joined_by_and() -> None:
    assert parse_filter_terms("") == []
    assert parse_filter_terms(' state = RUNNING  AND model="my model" AND x=') == [
        ("state", "RUNNING"),
        ("model", "my model"),
        ("x", ""),
    ]
    for bad in ("state", "state=RUNNING OR model=x", "a=b c", "=x"):
        with pytest.raises(InvalidArgument, match="filter"):
            parse_filter_terms(bad)
