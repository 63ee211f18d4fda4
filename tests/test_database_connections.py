"""Pooled PostgreSQL connections that the server dropped (a restart, a network cut): an idle
one is replaced before use; one dropped while in steady use fails one transaction as
unavailable (not as a conflict or a bug), and the next transaction works."""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mediatag_common import database as database_module
from mediatag_common.database import Database, DatabaseUnavailable, libpq_conninfo


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
