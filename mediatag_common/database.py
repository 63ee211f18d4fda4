"""The embedded database both services use: SQLAlchemy async engine, pragmas, migrations.

Writes are serialised through one lock: SQLite has a single writer anyway, and a serial
commit order is what keeps status revisions gap-free for watchers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

logger = logging.getLogger(__name__)


class DatabaseError(Exception):
    """The database could not be used; services wrap this in their own root error."""


@dataclass(frozen=True)
class Migration:
    """One versioned schema step, applied once, in order, on start.

    ``apply`` takes a synchronous connection, whichever way the database is driven.
    """

    version: int
    description: str
    apply: Callable[[Connection], None]


_migrations_table = sa.Table(
    "schema_migrations",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.String, nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)


AFTER_COMMIT = "mediatag.after_commit"


def after_commit(conn: AsyncConnection | Connection, callback: Callable[[], None]) -> None:
    """Run ``callback`` on the event loop once the write transaction of ``conn`` has committed."""
    conn.info[AFTER_COMMIT].append(callback)


def _driver_error(exc: SQLAlchemyError) -> BaseException:
    """What to raise for a driver error: the cancellation it interrupted, if any.

    A task cancelled mid-statement often fails again while rolling back; reporting that as
    a database outage would turn a shutdown into a retry loop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return asyncio.CancelledError()
    return DatabaseError(str(exc))


@asynccontextmanager
async def raising_as(
    context: AbstractAsyncContextManager[AsyncConnection],
    service_error: Callable[[DatabaseError], Exception],
) -> AsyncIterator[AsyncConnection]:
    """``context``'s connection, a :class:`DatabaseError` raised as the service's own error."""
    try:
        async with context as conn:
            yield conn
    except DatabaseError as exc:
        raise service_error(exc) from exc


def sqlite_url(path: str) -> str:
    """The SQLAlchemy URL of an SQLite file for aiosqlite."""
    return f"sqlite+aiosqlite:///{path}"


class Database:
    """An async engine with a serialised write path.

    ``read()`` hands out a connection for queries; ``write()`` a connection inside a
    transaction that commits on exit, one writer at a time.
    """

    def __init__(self, url: str, *, synchronous: str = "FULL") -> None:
        self.url = url
        self._engine: AsyncEngine = create_async_engine(url)
        self._write_lock = asyncio.Lock()
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine.sync_engine, "connect", sqlite_pragmas(synchronous))

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads; its implicit transaction ends on exit."""
        try:
            async with self._engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise _driver_error(exc) from exc

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that commits on exit (rolls back on error), one at a time.

        Callbacks registered with :func:`after_commit` run after the commit and before the
        next writer starts, so whatever they publish is published in commit order.
        """
        async with self._write_lock:
            callbacks: list[Callable[[], None]] = []
            try:
                async with self._engine.begin() as conn:
                    # Held by reference: once a cancelled statement has invalidated the
                    # transaction, even reading ``conn.info`` raises.
                    info = conn.info
                    info[AFTER_COMMIT] = callbacks
                    try:
                        yield conn
                    finally:
                        info.pop(AFTER_COMMIT, None)
            except SQLAlchemyError as exc:
                raise _driver_error(exc) from exc
            for callback in callbacks:
                callback()

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[AsyncConnection]:
        """A consistent read of several queries: no write commits while it runs."""
        async with self._write_lock, self.read() as conn:
            yield conn

    async def migrate(self, migrations: Sequence[Migration]) -> None:
        """Apply every migration not yet recorded, each in its own transaction."""
        try:
            async with self._write_lock, self._engine.connect() as conn:
                await conn.run_sync(apply_migrations, migrations)
        except SQLAlchemyError as exc:
            raise _driver_error(exc) from exc

    async def ping(self) -> bool:
        """True when a trivial query succeeds (for the health service)."""
        try:
            async with self.read() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except DatabaseError:
            return False
        return True

    async def close(self) -> None:
        await self._engine.dispose()


def apply_migrations(conn: Connection, migrations: Sequence[Migration]) -> None:
    """Apply every migration not yet recorded on ``conn``, each in its own transaction."""
    with conn.begin():
        _migrations_table.metadata.create_all(conn)
        applied = set(conn.execute(sa.select(_migrations_table.c.version)).scalars())
    for migration in sorted(migrations, key=lambda m: m.version):
        if migration.version in applied:
            continue
        with conn.begin():
            migration.apply(conn)
            conn.execute(
                _migrations_table.insert().values(
                    version=migration.version,
                    description=migration.description,
                    applied_at=time.time(),
                )
            )
        logger.info("applied schema migration %d: %s", migration.version, migration.description)


def sqlite_pragmas(synchronous: str) -> Callable[[Any, Any], None]:
    if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ValueError(f"unknown SQLite synchronous mode {synchronous!r}")

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect
