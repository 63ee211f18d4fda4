"""The database both services use: SQLite (the default) or PostgreSQL, one thread hop per
transaction.

Why not an asyncio driver: with aiosqlite every statement is several round trips between
the event loop and the driver's thread (cursor, execute, fetch, close), and a transaction of
six statements is some twenty-five. On a loop that also serves a thousand watch streams,
each trip waits behind a burst of stream callbacks, so a commit took hundreds of
milliseconds while the loop was only half busy. Here the loop hands a whole transaction,
written as a plain function of a synchronous SQLAlchemy connection, to a thread and is
woken once.

SQLite: writes run on one thread, in submission order (SQLite has a single writer anyway,
and a serial commit order is what keeps status revisions gap-free in one process); reads run
on their own threads beside it (WAL). PostgreSQL (psycopg 3): transactions run concurrently
on a pool of threads, one connection each; what must be ordered across them (revisions) is
ordered by the database itself (a counter row locked to commit).

Driver errors keep their meaning: :class:`DatabaseUnavailable` (the database cannot be
reached or used right now), :class:`DatabaseConflict` (a constraint or a concurrent
transaction got in the way: the caller decides), and plain :class:`DatabaseError` for what
is neither (a bug). Their messages carry the driver's one-line reason, never SQL text.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, make_url

from mediatag_common.sole_process import HeldByAnotherProcess, SoleProcessLock

if TYPE_CHECKING:
    from mediatag_common.migrations import Migration

logger = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE = "sqlite"
POSTGRESQL = "postgresql"

# Asyncio or other drivers a configured URL may name, and the driver used in their place.
_DRIVERS = {
    "sqlite": "sqlite+pysqlite",
    "sqlite+pysqlite": "sqlite+pysqlite",
    "sqlite+aiosqlite": "sqlite+pysqlite",
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
    "postgresql+asyncpg": "postgresql+psycopg",
    "postgresql+psycopg2": "postgresql+psycopg",
    "postgresql+psycopg_async": "postgresql+psycopg",
}
# SQLSTATEs of a transaction that lost to a concurrent one: retrying may succeed.
_CONCURRENCY_SQLSTATES = frozenset({"40001", "40P01"})
# A connection to let go of, as if the server had dropped it: a write on a server that can no
# longer write (after a failover, a connection that stayed on the old primary, now a standby
# or a reader, or one reopened there by a stale DNS name), and a session the server ended
# (idle too long in a transaction or out of one, shut down by an operator or a crash).
_RECONNECT_SQLSTATES = frozenset({"25006", "25P03", "57P01", "57P02", "57P05"})
# Server-side bounds for every PostgreSQL session: a replica that vanishes mid-transaction
# must not hold the revision counter's lock (or any other) for long.
_PG_SESSION_OPTIONS = "-c idle_in_transaction_session_timeout=30000 -c lock_timeout=30000"


def postgresql_connect_args(application_name: str) -> dict[str, Any]:
    """The libpq parameters of each connection to PostgreSQL, pooled or not."""
    return {
        "application_name": application_name,
        "options": _PG_SESSION_OPTIONS,
        # A peer that vanished is noticed within about a minute, and a firewall or NAT on
        # the way does not forget a connection that carries nothing for a while.
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "connect_timeout": 10,
    }


class DatabaseError(Exception):
    """A database failure that is neither an outage nor a conflict (most likely a bug)."""


class DatabaseInUse(DatabaseError):
    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(
            f"another process (pid {holder or 'unknown'}) serves from the SQLite database "
            f"{path}, and one process at a time may (several replicas need PostgreSQL)"
        )
        self.path = path
        self.holder = holder


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached or used right now (down, locked, full, gone away)."""


class DatabaseConflict(DatabaseError):
    """A uniqueness or other constraint, or a concurrent transaction, refused the change.

    ``retryable``: a concurrent transaction won (deadlock, serialization failure); the same
    transaction run again may succeed. A constraint refuses it again.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def database_url(url: str) -> sa.URL:
    """``url`` (libpq's ``postgresql://…`` form, several hosts too, SQLAlchemy's
    ``postgresql+driver://…`` forms, or ``sqlite:///path``) with the driver this module runs."""
    try:
        parsed = make_url(_hosts_as_parameters(url))
    except sa_exc.ArgumentError:
        raise ValueError(
            "not a database URL: use postgresql://USER@HOST:PORT/DB or sqlite:///PATH"
        ) from None
    driver = _DRIVERS.get(parsed.drivername)
    if driver is None:
        raise ValueError(
            f"unsupported database URL scheme {parsed.drivername!r}: "
            "use postgresql://USER@HOST:PORT/DB or sqlite:///PATH"
        )
    return parsed.set(drivername=driver)


def _hosts_as_parameters(url: str) -> str:
    """libpq's list of hosts (``postgresql://USER@HOST1:PORT1,HOST2:PORT2/DB``, for failover
    with ``target_session_attrs``) as its ``host`` and ``port`` parameters, which SQLAlchemy
    hands to libpq as they are (its own parser takes one host, or ports only in brackets)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not parts.scheme.startswith("postgres") or "," not in hosts:
        return url
    if {"host", "hostaddr", "port"} & {key for key, _ in parse_qsl(parts.query)}:
        raise ValueError("give the database hosts in the URL's host part or in its parameters")
    names, ports = zip(*(_host_and_port(entry) for entry in hosts.split(",")), strict=True)
    listed = urlencode(
        {"host": ",".join(names)} | ({"port": ",".join(ports)} if any(ports) else {})
    )
    query = f"{parts.query}&{listed}" if parts.query else listed
    return urlunsplit(parts._replace(netloc=userinfo + at, query=query))


def _host_and_port(entry: str) -> tuple[str, str]:
    """``HOST[:PORT]`` or ``[IPV6][:PORT]`` of a URL; the port "" (libpq's default) if none."""
    if entry.startswith("["):
        address, _, rest = entry[1:].partition("]")
        return address, rest.removeprefix(":")
    host, _, port = entry.partition(":")
    return unquote(host), port


def libpq_conninfo(url: str) -> str:
    """A PostgreSQL ``url`` (any form :func:`database_url` takes) as psycopg connects with it
    directly, password included: for connections outside the pool."""
    return database_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def sqlite_url(path: str) -> str:
    """The URL of an SQLite file."""
    return f"sqlite:///{path}"


def dialect_of(url: str) -> str:
    """``sqlite`` or ``postgresql``."""
    return database_url(url).get_backend_name()


def safe_url(url: str) -> str:
    """``url`` as written (its scheme too), with its password hidden, for logs and messages."""
    return make_url(_hosts_as_parameters(url)).render_as_string(hide_password=True)


def classify(error: sa_exc.SQLAlchemyError) -> DatabaseError:
    """The :class:`DatabaseError` that says what ``error`` means, without its SQL text."""
    original = getattr(error, "orig", None)
    reason = str(original if original is not None else error).strip().splitlines()
    message = reason[0] if reason else type(error).__name__
    sqlstate = getattr(original, "sqlstate", None)
    if sqlstate in _CONCURRENCY_SQLSTATES:
        return DatabaseConflict(message, retryable=True)
    if isinstance(error, sa_exc.IntegrityError):
        return DatabaseConflict(message)
    if isinstance(
        error,
        sa_exc.OperationalError
        | sa_exc.InterfaceError
        | sa_exc.DisconnectionError
        | sa_exc.TimeoutError,
    ):
        return DatabaseUnavailable(message)
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return DatabaseUnavailable(message)
    return DatabaseError(message)


AFTER_COMMIT = "mediatag.after_commit"


def after_commit(conn: Connection, callback: Callable[[], None]) -> None:
    """Run ``callback`` on the event loop once the write transaction of ``conn`` commits.

    On SQLite the callbacks of successive transactions run in commit order. On PostgreSQL
    transactions commit concurrently and no order between them is promised.
    """
    conn.info[AFTER_COMMIT].append(callback)


def insert(conn: Connection, table: sa.Table) -> Any:
    """An INSERT of ``table`` in ``conn``'s dialect, so ``on_conflict_do_nothing`` /
    ``on_conflict_do_update`` (the same on SQLite and PostgreSQL) are at hand."""
    if conn.dialect.name == POSTGRESQL:
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def unnest_parameters(columns: Sequence[tuple[str, str]], alias: str) -> str:
    """PostgreSQL SQL text: a table ``alias`` whose rows are the elements of array
    parameters, one parameter per ``(name, type)`` column, numbered from 1 in ``position``.
    One statement then writes a whole group of rows, each with its own values."""
    arrays = ", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in columns)
    names = ", ".join(name for name, _ in columns)
    return f"unnest({arrays}) WITH ORDINALITY AS {alias}({names}, position)"


def array_parameters(
    columns: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]
) -> dict[str, list[Any]]:
    """The parameters of :func:`unnest_parameters`: one list per column, from ``rows``."""
    return {name: [row[name] for row in rows] for name, _ in columns}


def database_now(conn: Connection) -> float:
    """Seconds since the epoch on the database's clock (PostgreSQL), so that processes on
    several machines agree on lease expiry and due times; SQLite is one process's file and
    uses that process's clock."""
    if conn.dialect.name == POSTGRESQL:
        return float(
            conn.execute(
                sa.text("SELECT extract(epoch FROM clock_timestamp())::float8")
            ).scalar_one()
        )
    return time.time()


class Database:
    """A synchronous engine driven from asyncio, one thread hop per transaction.

    ``write(fn)`` runs ``fn(connection)`` in a transaction and commits; callbacks registered
    with :func:`after_commit` are then scheduled on the caller's loop. ``read(fn)`` runs
    ``fn`` for reading only (each statement sees what is committed); ``snapshot(fn)`` runs
    it so that all its queries see one state (SQLite: on the writer thread; PostgreSQL: a
    REPEATABLE READ transaction). A caller cancelled while its function runs does not stop
    it: a write may still commit (as with any database whose answer is lost on the way back).
    """

    def __init__(
        self,
        url: str,
        *,
        synchronous: str = "FULL",
        readers: int = 2,
        pool_size: int = 8,
        sole_process: bool = False,
    ) -> None:
        """``sole_process``: on SQLite, refuse (:class:`DatabaseInUse`) a database file that
        another process opened so, and keep others from opening it so until closed."""
        engine_url = database_url(url)
        self.url = url
        self.dialect = engine_url.get_backend_name()
        if self.dialect == SQLITE:
            self._engine = sa.create_engine(
                engine_url,
                # Connections move between this object's threads, never used by two at once.
                connect_args={"check_same_thread": False},
                pool_size=readers + 1,
            )
            sa.event.listen(self._engine, "connect", sqlite_pragmas(synchronous))
            sa.event.listen(self._engine, "begin", _sqlite_begin)
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="db-writer")
            self._readers = ThreadPoolExecutor(readers, thread_name_prefix="db-reader")
        else:
            self._engine = sa.create_engine(
                engine_url,
                pool_size=pool_size,
                max_overflow=0,
                connect_args=postgresql_connect_args("mediatag"),
            )
            _ping_when_idle(self._engine)
            sa.event.listen(self._engine, "handle_error", _reconnect_when_gone)
            self._writer = ThreadPoolExecutor(pool_size, thread_name_prefix="db")
            self._readers = self._writer
        # Last, so that nothing above can fail with the lock taken.
        self._sole: SoleProcessLock | None = None
        if (
            self.dialect == SQLITE
            and sole_process
            and engine_url.database not in (None, "", ":memory:")
        ):
            self._sole = _hold_alone(Path(str(engine_url.database)))

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    async def write(self, transaction: Callable[[Connection], T]) -> T:
        """``transaction(conn)`` in a transaction that commits on return, rolls back on raise."""
        loop = asyncio.get_running_loop()
        return await asyncio.wrap_future(
            self._writer.submit(self._write_in_thread, transaction, loop)
        )

    async def read(self, query: Callable[[Connection], T]) -> T:
        """``query(conn)`` writing nothing: on SQLite in a transaction (one snapshot), on
        PostgreSQL statement by statement (for one snapshot, :meth:`snapshot`)."""
        return await asyncio.wrap_future(self._readers.submit(self._read_in_thread, query))

    async def autocommit(self, statement: Callable[[Connection], T]) -> T:
        """``statement(conn)`` where each statement commits on its own (PostgreSQL): for work
        that is one statement, atomic by itself, without :meth:`write`'s ``BEGIN`` and
        ``COMMIT`` round trips."""
        if self.dialect != POSTGRESQL:
            raise ValueError("statements commit on their own only on PostgreSQL")
        return await asyncio.wrap_future(
            self._writer.submit(self._in_thread, statement, autocommit=True)
        )

    async def snapshot(self, query: Callable[[Connection], T]) -> T:
        """``query(conn)`` with every statement seeing the same committed state."""
        return await asyncio.wrap_future(self._writer.submit(self._snapshot_in_thread, query))

    def run_sync(self, function: Callable[[Connection], T]) -> T:
        """``function(conn)`` on a connection of its own, in the calling thread, outside any
        transaction (it begins and commits its own): for start-up steps such as migrations."""
        try:
            with self._engine.connect() as conn:
                return function(conn)
        except sa_exc.SQLAlchemyError as exc:
            raise classify(exc) from exc

    def _write_in_thread(
        self, transaction: Callable[[Connection], T], loop: asyncio.AbstractEventLoop
    ) -> T:
        callbacks: list[Callable[[], None]] = []
        try:
            with self._engine.connect() as conn:
                conn.execution_options(**{_WRITING: True})
                with conn.begin():
                    # Held, not looked up again: once the server drops the connection,
                    # ``conn.info`` raises, and would hide why the transaction failed.
                    info = conn.info
                    info[AFTER_COMMIT] = callbacks
                    try:
                        result = transaction(conn)
                    finally:
                        info.pop(AFTER_COMMIT, None)
        except sa_exc.SQLAlchemyError as exc:
            raise classify(exc) from exc
        # Scheduled from the committing thread, before the caller resumes (on SQLite that is
        # the one writer thread, so they run on the loop in commit order).
        for callback in callbacks:
            loop.call_soon_threadsafe(callback)
        return result

    def _read_in_thread(self, query: Callable[[Connection], T]) -> T:
        # Under READ COMMITTED each statement reads its own snapshot, in a transaction or
        # not: without one, no BEGIN and ROLLBACK round trips.
        return self._in_thread(query, autocommit=self.dialect == POSTGRESQL)

    def _in_thread(self, work: Callable[[Connection], T], *, autocommit: bool) -> T:
        try:
            with self._engine.connect() as conn:
                if autocommit:
                    conn.execution_options(isolation_level="AUTOCOMMIT")
                return work(conn)
        except sa_exc.SQLAlchemyError as exc:
            raise classify(exc) from exc

    def _snapshot_in_thread(self, query: Callable[[Connection], T]) -> T:
        if self.dialect == SQLITE:
            return self._read_in_thread(query)
        try:
            with self._engine.connect() as conn:
                snapshot = conn.execution_options(isolation_level="REPEATABLE READ")
                with snapshot.begin():
                    return query(snapshot)
        except sa_exc.SQLAlchemyError as exc:
            raise classify(exc) from exc

    async def migrate(self, migrations: Sequence[Migration], *, lock_name: str) -> None:
        """Apply every migration not yet recorded (see :mod:`mediatag_common.migrations`)."""
        from mediatag_common.migrations import apply_migrations

        def migrate(conn: Connection) -> None:
            # Migrations read what is recorded, then write: on SQLite their transactions take
            # the write lock at once, as ``write``'s do, so that a process writing meanwhile
            # cannot make them fail ("database is locked") when they go from reading to writing.
            apply_migrations(
                conn.execution_options(**{_WRITING: True}), migrations, lock_name=lock_name
            )

        await asyncio.wrap_future(self._writer.submit(self.run_sync, migrate))

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
        if self._sole is not None:
            self._sole.release()


def _hold_alone(path: Path) -> SoleProcessLock:
    try:
        return SoleProcessLock(path.with_name(path.name + ".lock"))
    except HeldByAnotherProcess as held:
        raise DatabaseInUse(path, held.holder) from None


# How long an SQLite statement waits for another connection's write lock before it fails.
SQLITE_BUSY_TIMEOUT_MS = 5000


def sqlite_pragmas(synchronous: str) -> Callable[[Any, Any], None]:
    if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ValueError(f"unknown SQLite synchronous mode {synchronous!r}")

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The sqlite3 module's own transaction handling begins a transaction only before a
        # write, so a transaction's first reads would not be part of it; SQLAlchemy's
        # recipe: the module leaves transactions alone and ``_sqlite_begin`` begins them.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        _switch_to_wal(cursor)
        cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


def _switch_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL``, tried again while another connection holds the file.

    Processes opening a new file together each switch it to WAL; while another connection
    writes to the file before its own switch, SQLite refuses the switch at once ("database is
    locked": its busy handler is not called for it). Once one switch is done, the others find
    the file in WAL. So the switch waits, for as long as a busy statement would."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() > deadline:
                raise
        time.sleep(0.005)


# An execution option of the connections that ``Database.write`` runs transactions on.
_WRITING = "mediatag_writing"


def _sqlite_begin(conn: Connection) -> None:
    """Begin SQLite transactions explicitly: a write takes the write lock at once
    (``IMMEDIATE``), so what it reads cannot change before it writes, even with other
    processes on the file; a read sees one snapshot throughout."""
    immediate = conn.get_execution_options().get(_WRITING, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# A pooled PostgreSQL connection idle for longer than this is pinged before use: a server
# restart or a dropped connection shows there, not as a failed transaction. One in steady use
# is not (SQLAlchemy's pre-ping would add a round trip to every transaction).
PING_AFTER_IDLE = 1.0
_IDLE_SINCE = "mediatag_idle_since"


def _reconnect_when_gone(context: sa.engine.ExceptionContext) -> None:
    """A server that refuses writes as read-only, or ended the session, is handled as one
    that went away: the failure is an outage (``DatabaseUnavailable``), the pool discards
    its connections, and new ones go where the URL now leads (with several hosts and
    ``target_session_attrs=read-write``, libpq picks the one that writes). Kept, a
    connection left on a demoted primary would fail every write until the process ends."""
    if getattr(context.original_exception, "sqlstate", None) in _RECONNECT_SQLSTATES:
        context.is_disconnect = True


def _ping_when_idle(engine: sa.Engine) -> None:
    """SQLAlchemy's pessimistic disconnect handling, for idle connections only: a failed
    ping raises ``DisconnectionError``, and the pool replaces the connection."""

    def on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    def on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop(_IDLE_SINCE, None)
        if idle_since is not None and time.monotonic() - idle_since < PING_AFTER_IDLE:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise sa_exc.DisconnectionError(str(exc)) from exc

    sa.event.listen(engine, "checkin", on_checkin)
    sa.event.listen(engine, "checkout", on_checkout)
