"""Pooled PostgreSQL connections that the server dropped (a restart, a network cut): an idle
one is replaced before use; one dropped while in steady use fails one transaction as
unavailable (not as a conflict or a bug), and the next transaction works. A failover: a URL
naming several servers reaches the one that writes, and a pooled connection left on a server
that stopped writing is let go after one write fails as unavailable."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url

from mediatag_common import database as database_module
from mediatag_common.database import Database, DatabaseUnavailable, libpq_conninfo
from tests.conftest import wait_until
from tests.postgres import PostgresServer, throwaway_postgres_server


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[Database]:
    database = Database(postgres_url, pool_size=2)
    yield database
    await database.close()


def drop_every_connection(url: str) -> None:
    """What a server restart does to this database's connections."""
    with psycopg.connect(libpq_conninfo(url), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


def backend_pid(conn: Connection) -> int:
    return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


async def test_an_idle_connection_the_server_dropped_is_replaced_before_use(
    db: Database, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await db.write(backend_pid)
    drop_every_connection(postgres_url)
    # Every connection counts as idle: the ping runs on each checkout.
    monkeypatch.setattr(database_module, "PING_AFTER_IDLE", 0.0)

    after = await db.write(backend_pid)

    assert after != before


async def test_a_connection_dropped_in_steady_use_fails_one_transaction_as_unavailable(
    db: Database, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await db.write(backend_pid)
    drop_every_connection(postgres_url)
    # Used again at once: not pinged.
    monkeypatch.setattr(database_module, "PING_AFTER_IDLE", float("inf"))

    with pytest.raises(DatabaseUnavailable):
        await db.write(backend_pid)
    # The pool discarded the connections the server had dropped.
    assert await db.write(backend_pid) > 0


async def test_a_session_the_server_ended_for_idling_in_a_transaction_is_an_outage(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        database_module, "_PG_SESSION_OPTIONS", "-c idle_in_transaction_session_timeout=200"
    )
    db = Database(postgres_url, pool_size=1)

    def idles_in_its_transaction(conn: Connection) -> int:
        backend_pid(conn)
        time.sleep(1.0)  # past the server's bound: it ends the session
        return backend_pid(conn)

    try:
        with pytest.raises(DatabaseUnavailable, match="idle-in-transaction timeout"):
            await db.write(idles_in_its_transaction)
        assert await db.write(backend_pid) > 0
    finally:
        await db.close()


# ---- failover: a server that stops writing, and a URL that lists several ----


def execute(server: PostgresServer, *statements: str) -> None:
    with psycopg.connect(libpq_conninfo(server.admin_url), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def set_read_only(server: PostgresServer, read_only: bool) -> None:
    """What a switchover does to a server: from now on it refuses writes (or takes them),
    in the sessions it has as well as in new ones."""
    change = (
        "ALTER SYSTEM SET default_transaction_read_only = on"
        if read_only
        else "ALTER SYSTEM RESET default_transaction_read_only"
    )
    execute(server, change, "SELECT pg_reload_conf()")


def socket_directory(server: PostgresServer) -> str:
    return str(make_url(server.admin_url).query["host"])


def rows(server: PostgresServer) -> list[str]:
    with psycopg.connect(libpq_conninfo(server.admin_url), autocommit=True) as conn:
        return [str(row[0]) for row in conn.execute("SELECT note FROM written ORDER BY note")]


async def test_several_hosts_in_the_url_reach_the_one_that_writes_and_follow_a_switchover() -> None:
    with throwaway_postgres_server() as first, throwaway_postgres_server() as second:
        for server in (first, second):
            execute(server, "CREATE TABLE written (note text)")
        set_read_only(first, True)
        # libpq's form with two hosts (Unix socket directories here, so percent-encoded).
        hosts = ",".join(quote(socket_directory(s), safe="") for s in (first, second))
        url = f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"

        async def new_sessions_refuse_writes(server: PostgresServer) -> bool:
            with psycopg.connect(libpq_conninfo(server.admin_url)) as conn:
                return conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)

        await wait_until(lambda: new_sessions_refuse_writes(first))
        db = Database(url, pool_size=1)
        try:
            await db.write(insert("before"))
            assert (rows(first), rows(second)) == ([], ["before"])
            # The tailer's own connection, outside the pool, reads the same URL.
            with psycopg.connect(libpq_conninfo(url)) as listening:
                assert listening.info.host == socket_directory(second)

            # Switchover: the second refuses writes, the first takes them.
            set_read_only(first, False)
            set_read_only(second, True)

            async def pooled_session_refuses_writes() -> bool:
                shown = await db.read(
                    lambda conn: conn.execute(sa.text("SHOW default_transaction_read_only"))
                )
                return bool(shown.scalar_one() == "on")

            await wait_until(pooled_session_refuses_writes)
            # The write on the old server fails as unavailable (clients retry that), not as
            # a bug, and the pool lets the connection go ...
            with pytest.raises(DatabaseUnavailable, match="read-only transaction"):
                await db.write(insert("during"))
            # ... so the next one goes where the URL leads now.
            await db.write(insert("after"))
            assert (rows(first), rows(second)) == (["after"], ["before"])
        finally:
            await db.close()


def insert(note: str) -> Callable[[Connection], None]:
    def write(conn: Connection) -> None:
        conn.execute(sa.text("INSERT INTO written (note) VALUES (:note)"), {"note": note})

    return write
