"""The ingest service's database until its storage moves to :mod:`mediatag_common.database`:
an SQLAlchemy async engine whose writes are serialised through one lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from mediatag_common.database import (
    AFTER_COMMIT,
    SQLITE,
    DatabaseError,
    classify,
    database_url,
    sqlite_pragmas,
)
from mediatag_common.migrations import Migration, apply_migrations

logger = logging.getLogger(__name__)


def _driver_error(exc: SQLAlchemyError) -> BaseException:
    """What to raise for a driver error: the cancellation it interrupted, if any.

    A task cancelled mid-statement often fails again while rolling back; reporting that as
    a database outage would turn a shutdown into a retry loop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return asyncio.CancelledError()
    return classify(exc)


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


class Database:
    """An async engine with a serialised write path.

    ``read()`` hands out a connection for queries; ``write()`` a connection inside a
    transaction that commits on exit, one writer at a time.
    """

    def __init__(self, url: str, *, synchronous: str = "FULL") -> None:
        self.url = url
        engine_url = database_url(url)
        if engine_url.get_backend_name() == SQLITE:
            engine_url = engine_url.set(drivername="sqlite+aiosqlite")
        self._engine: AsyncEngine = create_async_engine(engine_url)
        self._write_lock = asyncio.Lock()
        if self._engine.dialect.name == SQLITE:
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

    async def migrate(self, migrations: Sequence[Migration], *, lock_name: str) -> None:
        """Apply every migration not yet recorded (see :mod:`mediatag_common.migrations`)."""

        def migrate(conn: Connection) -> None:
            apply_migrations(conn, migrations, lock_name=lock_name)

        try:
            async with self._write_lock, self._engine.connect() as conn:
                await conn.run_sync(migrate)
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
