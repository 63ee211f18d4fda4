"""A database whose transactions each run whole on a database thread.

Why not the asyncio driver: with aiosqlite every statement is several round trips between
the event loop and the driver's thread (cursor, execute, fetch, close), and a transaction of
six statements is some twenty-five. On a loop that also serves a thousand watch streams,
each trip waits behind a burst of stream callbacks, so a commit took hundreds of
milliseconds while the loop was only half busy. Here the loop hands a whole transaction,
written as a plain function of a synchronous connection, to a thread and is woken once.

Writes run on one thread, in submission order: SQLite has a single writer anyway, and a
serial commit order is what keeps status revisions gap-free. Reads run on their own threads
(SQLite's WAL lets them proceed beside the writer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError

from mediatag_common.database import (
    AFTER_COMMIT,
    DatabaseError,
    Migration,
    apply_migrations,
    sqlite_pragmas,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Async drivers a configured URL may name, and the synchronous driver used in their place.
_SYNC_DRIVERS = {"sqlite+aiosqlite": "sqlite+pysqlite", "postgresql+asyncpg": "postgresql+psycopg"}


def sync_url(url: str) -> sa.URL:
    """``url`` with an asyncio driver replaced by its synchronous counterpart."""
    parsed = make_url(url)
    return parsed.set(drivername=_SYNC_DRIVERS.get(parsed.drivername, parsed.drivername))


class ThreadedDatabase:
    """A synchronous engine driven from asyncio, one thread hop per transaction.

    ``write(fn)`` runs ``fn(connection)`` in a transaction on the writer thread and commits;
    callbacks registered with :func:`mediatag_common.database.after_commit` are then
    scheduled on the caller's loop in commit order. ``read(fn)`` runs ``fn`` on a reader
    thread; ``snapshot(fn)`` runs it on the writer thread, so no commit lands between its
    queries. A caller cancelled while its function runs does not stop it: a write may still
    commit (as with any database whose answer is lost on the way back).
    """

    def __init__(self, url: str, *, synchronous: str = "FULL", readers: int = 2) -> None:
        engine_url = sync_url(url)
        self.url = url
        connect_args: dict[str, object] = {}
        if engine_url.get_backend_name() == "sqlite":
            # Connections move between this object's threads, never used by two at once.
            connect_args["check_same_thread"] = False
        self._engine = sa.create_engine(
            engine_url, connect_args=connect_args, pool_size=readers + 1, pool_pre_ping=False
        )
        if self._engine.dialect.name == "sqlite":
            sa.event.listen(self._engine, "connect", sqlite_pragmas(synchronous))
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="db-writer")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="db-reader")

    async def write(self, transaction: Callable[[Connection], T]) -> T:
        """``transaction(conn)`` in a transaction that commits on return, rolls back on raise."""
        loop = asyncio.get_running_loop()
        return await asyncio.wrap_future(
            self._writer.submit(self._write_in_thread, transaction, loop)
        )

    async def read(self, query: Callable[[Connection], T]) -> T:
        """``query(conn)`` on a reader thread."""
        return await asyncio.wrap_future(self._readers.submit(self._read_in_thread, query))

    async def snapshot(self, query: Callable[[Connection], T]) -> T:
        """``query(conn)`` with no commit between its statements."""
        return await asyncio.wrap_future(self._writer.submit(self._read_in_thread, query))

    def _write_in_thread(
        self, transaction: Callable[[Connection], T], loop: asyncio.AbstractEventLoop
    ) -> T:
        callbacks: list[Callable[[], None]] = []
        try:
            with self._engine.begin() as conn:
                conn.info[AFTER_COMMIT] = callbacks
                try:
                    result = transaction(conn)
                finally:
                    conn.info.pop(AFTER_COMMIT, None)
        except SQLAlchemyError as exc:
            raise DatabaseError(str(exc)) from exc
        # Scheduled from this one thread, so they run on the loop in commit order, and
        # before the caller resumes.
        for callback in callbacks:
            loop.call_soon_threadsafe(callback)
        return result

    def _read_in_thread(self, query: Callable[[Connection], T]) -> T:
        try:
            with self._engine.connect() as conn:
                return query(conn)
        except SQLAlchemyError as exc:
            raise DatabaseError(str(exc)) from exc

    async def migrate(self, migrations: Sequence[Migration]) -> None:
        """Apply every migration not yet recorded, each in its own transaction."""
        await asyncio.wrap_future(self._writer.submit(self._migrate_in_thread, migrations))

    def _migrate_in_thread(self, migrations: Sequence[Migration]) -> None:
        try:
            with self._engine.connect() as conn:
                apply_migrations(conn, migrations)
        except SQLAlchemyError as exc:
            raise DatabaseError(str(exc)) from exc

    async def ping(self) -> bool:
        """True when a trivial query succeeds (for the health service)."""
        try:
            await self.read(lambda conn: conn.execute(sa.text("SELECT 1")))
        except DatabaseError:
            return False
        return True

    async def close(self) -> None:
        """Wait for submitted work, then close every connection."""
        await asyncio.to_thread(self._close_in_thread)

    def _close_in_thread(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._engine.dispose()
