"""Versioned schema migrations: SQL files, one set per database, applied once, in order.

A service keeps its migrations in a package (``…/storage/migrations``) with one folder per
dialect, ``sqlite/`` and ``postgresql/``, each holding ``NNNN_what_it_does.sql`` files with
the same versions. A file is plain DDL/DML separated by ``;`` at the end of a line, headed by
``--`` comment lines whose first paragraph (up to a bare ``--`` line or the SQL) describes the
migration. Files are never edited once released (their header comments aside): a migration
is what it created then, so a later change to a table is a new file (never a ``create_all``
of today's table definitions, which would change what an old migration makes).

On start each service applies the versions its database has not recorded, each in its own
transaction, and records them in ``schema_migrations`` with its name: a database belongs to
one service, and the other refuses it (their versions overlap; each would take the other's as
its own). Rows that earlier releases recorded carry no name; the database is the service's if
it has the tables of the service's first migration. A database with versions the service
does not know was migrated by a newer release, whose new tables the old code would not keep
in step (a job count, say): the service refuses to start on it.

The whole run, from reading what is recorded to the last migration, holds a lock of the
database (PostgreSQL: an advisory lock; SQLite: a ``flock`` on a file beside it), so processes
starting together apply each migration once, two services given one database by mistake
migrate one after the other, and the second refuses it. The others wait, however long a
migration takes (an index built on a large table): the wait is bound neither by PostgreSQL
sessions' ``lock_timeout`` nor by SQLite's busy timeout. Then they find nothing left to do.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources

import sqlalchemy as sa
from sqlalchemy.engine import Connection

logger = logging.getLogger(__name__)

# SQLAlchemy's dialect names; a migration has one file per dialect.
DIALECTS = ("sqlite", "postgresql")
_FILE_NAME = re.compile(r"(?P<version>\d{4})_(?P<slug>[a-z0-9_]+)\.sql")
# The table of applied versions; the same DDL on both databases (and what earlier releases
# created on SQLite). The column ``service`` is added to it (:func:`recorded_versions`).
_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER NOT NULL,
    description VARCHAR NOT NULL,
    applied_at FLOAT NOT NULL,
    PRIMARY KEY (version)
)
"""
# A table a migration creates, in a statement of its file.
_CREATE_TABLE = re.compile(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", re.IGNORECASE)
# Beside an SQLite database ``PATH``: ``PATH`` + this, the file its migrations lock.
_SQLITE_LOCK_SUFFIX = ".migrations.lock"


@dataclass(frozen=True)
class Migration:
    """One schema version: its statements for each dialect."""

    version: int
    description: str
    statements: Mapping[str, tuple[str, ...]]


def split_statements(script: str) -> tuple[str, ...]:
    """The statements of a migration file: split at ``;`` ending a line, comments dropped."""
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    statements = re.split(r";[ \t]*(?:\n|$)", "\n".join(lines))
    return tuple(s.strip() for s in statements if s.strip())


def header_description(script: str) -> str:
    """The first paragraph of a migration file's header comment, on one line ("" if none)."""
    words = []
    for line in script.splitlines():
        if not line.startswith("--") or not line.removeprefix("--").strip():
            break
        words.append(line.removeprefix("--").strip())
    return " ".join(words)


def load_migrations(package: str) -> tuple[Migration, ...]:
    """The migrations in ``package``'s dialect folders, by version.

    Raises ``ValueError`` when the folders disagree on the versions or a name is malformed.
    """
    found: dict[int, dict[str, tuple[str, str]]] = {}
    root = resources.files(package)
    for dialect in DIALECTS:
        for entry in sorted(root.joinpath(dialect).iterdir(), key=lambda e: e.name):
            if not entry.name.endswith(".sql"):
                continue
            match = _FILE_NAME.fullmatch(entry.name)
            if match is None:
                raise ValueError(
                    f"migration file {dialect}/{entry.name}: name is not NNNN_slug.sql"
                )
            script = entry.read_text(encoding="utf-8")
            description = header_description(script) or match["slug"].replace("_", " ")
            found.setdefault(int(match["version"]), {})[dialect] = (description, script)
    migrations = []
    for version in sorted(found):
        by_dialect = found[version]
        missing = [d for d in DIALECTS if d not in by_dialect]
        if missing:
            raise ValueError(
                f"migration {version:04d} of {package} has no {', '.join(missing)} file"
            )
        migrations.append(
            Migration(
                version=version,
                description=by_dialect["sqlite"][0],
                statements={d: split_statements(script) for d, (_, script) in by_dialect.items()},
            )
        )
    return tuple(migrations)


class SchemaTooNew(RuntimeError):
    """The database holds migrations of a newer release than this one (the service cannot
    start on it)."""


class AnotherServicesDatabase(RuntimeError):
    """The database belongs to another service (the service cannot start on it)."""


def lock_key(name: str) -> int:
    """A stable 32-bit key for ``pg_advisory_lock`` from a name."""
    return zlib.crc32(name.encode())


# The advisory lock of a PostgreSQL database's migrations (advisory locks are each database's
# own). The same for every service: two services given one database by mistake migrate one
# after the other, and the second finds the first's versions and refuses them.
MIGRATIONS_LOCK_KEY = lock_key("mediatag schema migrations")


@contextmanager
def migration_lock(conn: Connection) -> Iterator[None]:
    """Hold the lock of ``conn``'s database that a migration run holds, waiting (and saying
    so) while another process holds it. ``conn`` must not be in a transaction.

    PostgreSQL: the session-level advisory lock :data:`MIGRATIONS_LOCK_KEY` (taken again by
    the session holding it). SQLite: an exclusive ``flock`` on ``PATH.migrations.lock``
    beside the database file (held by an open file, not a process: a second hold in one
    process waits for the first); an in-memory database, which no other process sees, is not
    locked.
    """
    if conn.dialect.name == "postgresql":
        with _advisory_lock(conn):
            yield
        return
    database = conn.engine.url.database
    if database in (None, "", ":memory:"):
        yield
        return
    descriptor = os.open(
        f"{database}{_SQLITE_LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
    )
    try:
        # Not SQLite's own write lock: a process waiting for it would fail after the busy
        # timeout while another runs a long migration. The kernel drops a flock with its
        # process, killed or not: no stale lock after a crash.
        _take(lambda: _try_flock(descriptor), lambda: fcntl.flock(descriptor, fcntl.LOCK_EX))
        yield
    finally:
        os.close(descriptor)


def _try_flock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def _advisory_lock(conn: Connection) -> Iterator[None]:
    """The advisory lock held by ``conn``'s session (not its transaction) while in the block.

    The holder is another process migrating, and a migration may run for minutes (an index
    built on a large table): its lock is waited for however long, not for the sessions'
    ``lock_timeout``, which would fail this process's start while the other one is about to
    leave nothing to do. ``SET LOCAL``: only this transaction's; the migrations' own
    statements keep the timeout, so one blocked by a forgotten session fails rather than
    hangs."""
    parameters = {"key": MIGRATIONS_LOCK_KEY}

    def wait() -> None:
        conn.execute(sa.text("SET LOCAL lock_timeout = 0"))
        conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), parameters)

    _take(
        lambda: bool(
            conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), parameters).scalar_one()
        ),
        wait,
    )
    # Ends the transaction (and the SET LOCAL); the lock is the session's, held until unlocked.
    conn.commit()
    try:
        yield
    finally:
        conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), parameters)
        conn.commit()


def _take(try_lock: Callable[[], bool], wait: Callable[[], None]) -> None:
    """Take a lock with ``try_lock``, or else say that this process waits and ``wait``."""
    if try_lock():
        return
    logger.info("waiting for another process to finish migrating this database")
    started = time.monotonic()
    wait()
    logger.info("the other process's migration ended after %.1f s", time.monotonic() - started)


def apply_migrations(
    conn: Connection, migrations: Sequence[Migration], *, lock_name: str
) -> list[int]:
    """Apply every migration not yet recorded on ``conn``; the versions applied.

    ``conn`` must not be in a transaction. ``lock_name`` is the service's name
    (``mediatag-ingest``): the migrations are recorded with it, and a database recorded with
    another's is refused (:class:`AnotherServicesDatabase`), as is one with versions
    unknown to ``migrations`` (:class:`SchemaTooNew`). The run holds :func:`migration_lock`.
    """
    dialect = conn.dialect.name
    with migration_lock(conn):
        with conn.begin():
            applied = recorded_versions(conn, migrations, service=lock_name)
        unknown = sorted(applied - {m.version for m in migrations})
        if unknown:
            raise SchemaTooNew(
                f"the database was migrated by a newer release (schema versions "
                f"{', '.join(map(str, unknown))} are unknown to this one): start that "
                "release, or restore the backup taken before the upgrade"
            )
        done = []
        for migration in sorted(migrations, key=lambda m: m.version):
            if migration.version in applied:
                continue
            with conn.begin():
                for statement in migration.statements[dialect]:
                    conn.exec_driver_sql(statement)
                conn.execute(
                    sa.text(
                        "INSERT INTO schema_migrations "
                        "(version, description, applied_at, service) "
                        "VALUES (:version, :description, :applied_at, :service)"
                    ),
                    {
                        "version": migration.version,
                        "description": migration.description,
                        "applied_at": time.time(),
                        "service": lock_name,
                    },
                )
            done.append(migration.version)
            logger.info("applied schema migration %d: %s", migration.version, migration.description)
        return done


def recorded_versions(
    conn: Connection, migrations: Sequence[Migration], *, service: str
) -> set[int]:
    """The versions recorded on ``conn``, once its database is known to be ``service``'s.

    The service's name is a column of each row rather than a row or a table of its own:
    earlier releases read only the versions (and would refuse a version they do not know)
    and insert rows naming their columns, and their ``copy-database`` refuses a table it
    does not know. Their rows carry no name: a database whose first migration's tables are
    there is the service's, and its rows get the name.
    """
    conn.execute(sa.text(_MIGRATIONS_TABLE))
    columns = {column["name"] for column in sa.inspect(conn).get_columns("schema_migrations")}
    if "service" not in columns:
        conn.execute(sa.text("ALTER TABLE schema_migrations ADD COLUMN service VARCHAR"))
    recorded = conn.execute(sa.text("SELECT version, service FROM schema_migrations")).all()
    others = sorted({owner for _, owner in recorded if owner is not None} - {service})
    if others:
        raise AnotherServicesDatabase(
            f"the database belongs to the {', '.join(others)} service, not to {service}: "
            "each service needs a database of its own"
        )
    if any(owner is None for _, owner in recorded):
        inspector = sa.inspect(conn)
        missing = [
            t for t in _first_tables(migrations, conn.dialect.name) if not inspector.has_table(t)
        ]
        if missing:
            raise AnotherServicesDatabase(
                f"the database belongs to another service, not to {service}: an earlier "
                f"release migrated it, and it lacks {', '.join(missing)}, made by {service}'s "
                "first migration"
            )
        conn.execute(
            sa.text("UPDATE schema_migrations SET service = :service WHERE service IS NULL"),
            {"service": service},
        )
    return {version for version, _ in recorded}


def _first_tables(migrations: Sequence[Migration], dialect: str) -> list[str]:
    """The tables the first of ``migrations`` creates."""
    if not migrations:
        return []
    first = min(migrations, key=lambda m: m.version)
    return [
        match[1]
        for statement in first.statements[dialect]
        if (match := _CREATE_TABLE.match(statement)) is not None
    ]
