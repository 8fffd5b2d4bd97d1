"""PostgreSQL from the pgserver wheel's binaries."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from tensorway.devstack._component import Component, LaunchContext, PackageFile, Started, loopback
from tensorway.devstack._errors import DevStackError
from tensorway.devstack._state import Endpoint

DATABASE = "tensorway"
SUPERUSER = "postgres"
INITDB_BINARY = PackageFile("pgserver", "pginstall/bin/initdb", "pgserver")
POSTGRES_BINARY = PackageFile("pgserver", "pginstall/bin/postgres", "pgserver")


@dataclass(frozen=True)
class _OsAccount:
    uid: int
    gid: int
    name: str


SERVER_SETTINGS = (
    "listen_addresses=127.0.0.1",
    # No Unix socket: its path would be another file outside our control.
    "unix_socket_directories=",
    # Dynamic shared memory in the data dir rather than /dev/shm, so a killed server leaves
    # nothing outside the state dir.
    "dynamic_shared_memory_type=mmap",
    # Dev data: durability is not worth the writes.
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
)
"""The server's settings (`-c`), for a dev database on loopback."""


class Postgres(Component):
    """PostgreSQL 16 with trust auth on loopback and fsync off, database ``tensorway``."""

    name = "postgres"
    port_settings = ("postgres_port",)

    def __init__(
        self,
        initdb: PackageFile = INITDB_BINARY,
        postgres: PackageFile = POSTGRES_BINARY,
    ) -> None:
        self._initdb = initdb
        self._postgres = postgres

    def start(self, ctx: LaunchContext) -> Started:
        initdb = self._initdb.locate(self.name)
        postgres = self._postgres.locate(self.name)
        account = _server_account(ctx)
        data_dir = ctx.home / "data"
        if account is not None:
            _check_reachable(ctx.home, account)
            os.chown(ctx.home, account.uid, account.gid)
        user = None if account is None else account.uid
        group = None if account is None else account.gid
        if not (data_dir / "PG_VERSION").exists():
            shutil.rmtree(data_dir, ignore_errors=True)
            ctx.run_setup(
                [
                    str(initdb),
                    "-D",
                    str(data_dir),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                    "--no-instructions",
                ],
                what="initdb",
                timeout=ctx.settings.start_timeout,
                user=user,
                group=group,
            )
        port = ctx.port("postgres_port")
        process = ctx.spawn(
            [
                str(postgres),
                "-D",
                str(data_dir),
                "-p",
                str(port),
                *(arg for setting in SERVER_SETTINGS for arg in ("-c", setting)),
            ],
            user=user,
            group=group,
        )
        admin_url = f"postgresql://{SUPERUSER}@{loopback(port)}/postgres"
        ctx.wait_ready(process, lambda: _select_one(admin_url), what="SELECT 1")
        _create_database(admin_url)
        return Started(
            process=process,
            endpoints={
                "postgres": Endpoint(
                    address=loopback(port),
                    url=f"postgresql://{SUPERUSER}@{loopback(port)}/{DATABASE}",
                )
            },
            # SIGINT is PostgreSQL's fast shutdown: SIGTERM would wait for every
            # client (a test's pool, a psql) to disconnect first.
            stop_signal=signal.SIGINT,
        )


def _server_account(ctx: LaunchContext) -> _OsAccount | None:
    """The unprivileged account to run as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    name = ctx.settings.postgres_os_user
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise DevStackError(
            "postgres",
            f"PostgreSQL refuses to run as root and there is no OS user {name!r} to run it as",
            "create one (useradd --system NAME) and set TENSORWAY_DEV_POSTGRES_OS_USER",
        ) from None
    return _OsAccount(uid=entry.pw_uid, gid=entry.pw_gid, name=name)


def _check_reachable(directory: Path, account: _OsAccount) -> None:
    """Fail clearly when the server's account cannot reach its data directory."""
    for parent in directory.resolve().parents:
        mode = parent.stat()
        if mode.st_uid == account.uid:
            searchable = bool(mode.st_mode & stat.S_IXUSR)
        elif mode.st_gid == account.gid:
            searchable = bool(mode.st_mode & stat.S_IXGRP)
        else:
            searchable = bool(mode.st_mode & stat.S_IXOTH)
        if not searchable:
            raise DevStackError(
                "postgres",
                f"PostgreSQL runs as {account.name!r} (it refuses root) and cannot reach "
                f"{directory}: {parent} is not searchable by that user",
                f"chmod o+x {parent}, or use a state dir under a world-searchable path",
            )


def _select_one(url: str) -> None:
    with psycopg.connect(url, connect_timeout=2) as connection:
        connection.execute("SELECT 1").fetchone()


def _create_database(admin_url: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
        if exists is None:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
