"""Copy a service's database into a new one: from SQLite to PostgreSQL (or back).

The copy works from the tables a service declares, so a table added to them (with its
migration) is copied without changes here. What it does, in order:

1. Refuses a source or destination whose schema is newer than this release knows: its newer
   tables and columns would be left behind. (A service started on a newer schema does start,
   migrations only adding; a copy must not go on.) Refuses a source no migration made.
2. Migrates both to the newest version, as the service does when it starts.
3. Refuses a destination that holds rows beyond those its migrations put there (the initial
   counters): a copy never merges into data.
4. Copies every table in foreign-key order, streaming the source in batches (one batch in
   memory at a time) from one consistent snapshot, into one destination transaction: a copy
   that fails, or is cancelled, leaves the destination as empty as it was.
5. Moves each identity column's sequence past the copied ids (PostgreSQL), so new rows get
   new ids; checks that each table holds as many rows as the source; then commits.

Rows are copied as they are, leases of PROCESSING jobs included: with the services stopped,
a lease expires as it would after a restart on the old database, and the job runs again. So
the rule is simple: stop every process of the service (every replica) before copying; one
still writing to the source would lose what it writes after the snapshot.

Values go through the tables' column types (booleans and bytes are each database's own),
except JSON, which is copied as its stored text: a JSON ``null`` and an SQL ``NULL`` stay
what they were (both read back as ``None``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.schema import sort_tables

from mediatag_common.database import SQLITE, Database, DatabaseInUse, database_url, safe_url
from mediatag_common.migrations import (
    AnotherServicesDatabase,
    Migration,
    apply_migrations,
    recorded_versions,
)

# Rows held in memory at once: a batch of the widest table (media with a 1,408-float
# embedding, about 6 KB a row) stays within a few MB.
BATCH_ROWS = 500
_MIGRATIONS_TABLE = "schema_migrations"


class CopyError(Exception):
    """The copy did not happen; the destination holds nothing of it."""


class CopyRefused(CopyError):
    """The databases are not ones this release can copy between (the message says why)."""


class _CopyStopped(CopyError):
    """The copy was asked to stop (its caller was cancelled) and rolled back."""


@dataclass(frozen=True)
class ServiceSchema:
    """What one service keeps in its database: its tables and the migrations making them."""

    service: str
    tables: Sequence[sa.Table]
    migrations: Sequence[Migration]
    lock_name: str
    # On SQLite the service is one process, holding its database alone while it runs.
    sole_process: bool = False


@dataclass(frozen=True)
class TableCopied:
    """One table's part of a copy."""

    table: str
    rows: int
    # The next id the destination hands out, for a table with an identity column.
    next_id: int | None = None


async def copy_database(
    schema: ServiceSchema,
    source_url: str,
    destination_url: str,
) -> list[TableCopied]:
    """Copy the database at ``source_url`` into the one at ``destination_url`` (see the
    module's docstring); what each table received, in the order copied.

    Raises :class:`CopyRefused` before copying a row, :class:`CopyError` when the copy was
    rolled back, and
    :class:`~mediatag_common.database.DatabaseError` when a database fails.

    Cancelled, the copy stops at its next batch and rolls back, then ``CancelledError`` is
    raised. A cancellation that comes once the copy is committing changes nothing: it
    returns what it copied.
    """
    if _same_database(source_url, destination_url):
        raise CopyRefused("the source and the destination are the same database")
    stop = threading.Event()
    copying = asyncio.create_task(_copy(schema, source_url, destination_url, stop))
    # A thread cannot be cancelled, and whether the copy rolled back or committed is known
    # only once it ends: a cancelled caller asks it to stop, and waits for it all the same.
    while not copying.done():
        try:
            await asyncio.wait([copying])
        except asyncio.CancelledError:
            stop.set()
    try:
        return copying.result()
    except _CopyStopped:
        raise asyncio.CancelledError() from None


def _same_database(first_url: str, second_url: str) -> bool:
    """Whether two URLs name one database: SQLite files by their resolved paths (a relative
    and an absolute path may name one file), other databases as written."""
    first, second = database_url(first_url), database_url(second_url)
    if first.get_backend_name() == second.get_backend_name() == SQLITE:
        return Path(first.database or "").resolve() == Path(second.database or "").resolve()
    return first == second


async def _copy(
    schema: ServiceSchema, source_url: str, destination_url: str, stop: threading.Event
) -> list[TableCopied]:
    source = _open(schema, source_url)
    try:
        destination = _open(schema, destination_url)
    except BaseException:
        await source.close()
        raise
    try:
        for database, role in ((source, "source"), (destination, "destination")):
            check = _check_version(schema, role, safe_url(database.url))
            await asyncio.to_thread(database.run_sync, check)
            await database.migrate(schema.migrations, lock_name=schema.lock_name)
        copier = _Copier(schema, stop)
        return await asyncio.to_thread(
            source.run_sync, lambda src: destination.run_sync(lambda dst: copier.copy(src, dst))
        )
    finally:
        await source.close()
        await destination.close()


def _open(schema: ServiceSchema, url: str) -> Database:
    """``url``'s database, held as the service holds it: an SQLite database the service
    serves from alone is refused while it runs (it would go on writing after the copy)."""
    try:
        return Database(url, sole_process=schema.sole_process)
    except DatabaseInUse as in_use:
        raise CopyRefused(
            f"the {schema.service} service (pid {in_use.holder or 'unknown'}) is running on "
            f"{in_use.path}: stop it first"
        ) from None


def _check_version(schema: ServiceSchema, role: str, url: str) -> Callable[[Connection], None]:
    """Refuse a database newer than ``schema`` knows, and a source no service made."""
    known = max(m.version for m in schema.migrations)

    def check(conn: Connection) -> None:
        newest = None
        if sa.inspect(conn).has_table(_MIGRATIONS_TABLE):
            try:
                # Whose it is comes first: the other service's may have more versions.
                recorded = recorded_versions(conn, schema.migrations, service=schema.lock_name)
            except AnotherServicesDatabase as error:
                raise CopyRefused(f"the {role} {url}: {error}") from None
            finally:
                # Read only: the service's name it records on an earlier release's rows is
                # the migration's to write.
                conn.rollback()
            newest = max(recorded, default=None)
        conn.rollback()
        if newest is None and role == "source":
            raise CopyRefused(f"the source {url} holds no {schema.service} database")
        if newest is not None and newest > known:
            raise CopyRefused(
                f"the {role} {url} has {schema.service} schema version {newest}, newer than "
                f"{known}, the newest this release knows: copy with the release that made it"
            )

    return check


class _Copier:
    """One copy between two migrated databases (runs on a database thread); it rolls back at
    its next batch once ``stop`` is set."""

    def __init__(self, schema: ServiceSchema, stop: threading.Event) -> None:
        self._tables = sort_tables(schema.tables)
        self._migrations = schema.migrations
        self._stop = stop

    def copy(self, source: Connection, destination: Connection) -> list[TableCopied]:
        with self._snapshot(source), destination.begin():
            self._refuse_unknown_tables(source)
            self._refuse_rows(destination)
            copied = [self._copy_table(table, source, destination) for table in self._tables]
            self._verify(source, destination)
            # The last moment to stop: past it, the copy commits.
            self._stop_if_asked()
            return copied

    def _stop_if_asked(self) -> None:
        if self._stop.is_set():
            raise _CopyStopped("the copy was stopped; nothing was committed")

    def _snapshot(self, source: Connection) -> sa.RootTransaction:
        """A transaction in which every read of ``source`` sees one committed state."""
        # SQLite: a transaction of ``Database`` is one snapshot (see ``_sqlite_begin``).
        if source.dialect.name != SQLITE:
            source.execution_options(isolation_level="REPEATABLE READ")
        return source.begin()

    def _refuse_unknown_tables(self, source: Connection) -> None:
        known = {table.name for table in self._tables} | {_MIGRATIONS_TABLE}
        unknown = sorted(set(sa.inspect(source).get_table_names()) - known)
        if unknown:
            raise CopyRefused(
                f"the source holds tables this release does not copy: {', '.join(unknown)}"
            )

    def _refuse_rows(self, destination: Connection) -> None:
        """Refuse a destination holding anything but the rows its migrations made."""
        seeded = _seeded_rows(self._tables, self._migrations)
        for table in self._tables:
            present = _count(destination, table)
            if present and (
                present != len(seeded[table.name])
                or set(_rows(destination, table)) != seeded[table.name]
            ):
                raise CopyRefused(
                    f"the destination's table {table.name} holds {present} row(s): copy into "
                    "a new, empty database (a copy never merges)"
                )

    def _copy_table(
        self, table: sa.Table, source: Connection, destination: Connection
    ) -> TableCopied:
        # Rows the migrations made (the initial counters) make way for the source's.
        destination.execute(table.delete())
        insert = table.insert().values(
            {column.key: _bind(column, destination.dialect.name) for column in table.columns}
        )
        result = source.execute(
            _stored_values(table).order_by(*table.primary_key.columns),
            execution_options={"yield_per": BATCH_ROWS},
        )
        rows = 0
        for batch in result.partitions():
            self._stop_if_asked()
            destination.execute(insert, [dict(row._mapping) for row in batch])
            rows += len(batch)
        return TableCopied(table.name, rows, _move_identity(table, destination))

    def _verify(self, source: Connection, destination: Connection) -> None:
        for table in self._tables:
            expected, present = _count(source, table), _count(destination, table)
            if present != expected:
                raise CopyError(
                    f"table {table.name}: {present} row(s) copied of {expected}; "
                    "nothing was committed"
                )


def _stored_values(table: sa.Table) -> sa.Select[Any]:
    """Every column of ``table``; JSON as its stored text."""
    return sa.select(
        *(
            sa.cast(column, sa.Text).label(column.key)
            if isinstance(column.type, sa.JSON)
            else column
            for column in table.columns
        )
    )


def _bind(column: sa.Column[Any], dialect: str) -> sa.ColumnElement[Any]:
    """The parameter a column's value is inserted with (see :func:`_stored_values`)."""
    if not isinstance(column.type, sa.JSON):
        return sa.bindparam(column.key, type_=column.type)
    text = sa.bindparam(column.key, type_=sa.Text)
    # SQLite keeps JSON as text (and CAST(… AS JSON) would give it numeric affinity).
    return text if dialect == SQLITE else sa.cast(text, column.type)


def _move_identity(table: sa.Table, destination: Connection) -> int | None:
    """On PostgreSQL, set ``table``'s identity sequence past the copied ids; the next id."""
    column = table.autoincrement_column
    if column is None:
        return None
    next_id = int(
        destination.execute(sa.select(sa.func.coalesce(sa.func.max(column), 0) + 1)).scalar_one()
    )
    if destination.dialect.name != SQLITE:
        sequence = sa.func.pg_get_serial_sequence(
            destination.dialect.identifier_preparer.format_table(table), column.name
        )
        destination.execute(sa.select(sa.func.setval(sequence, next_id, False)))
    return next_id


def _count(conn: Connection, table: sa.Table) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def _rows(conn: Connection, table: sa.Table) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in conn.execute(_stored_values(table))]


def _seeded_rows(
    tables: Sequence[sa.Table], migrations: Sequence[Migration]
) -> dict[str, set[tuple[Any, ...]]]:
    """The rows the migrations themselves insert, per table (read from an in-memory SQLite
    database migrated from nothing)."""
    engine = sa.create_engine("sqlite://")
    try:
        with engine.connect() as conn:
            apply_migrations(conn, migrations, lock_name="")
            return {table.name: set(_rows(conn, table)) for table in tables}
    finally:
        engine.dispose()
