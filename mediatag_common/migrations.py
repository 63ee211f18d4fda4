"""Versioned schema migrations: SQL files, one set per database, applied once, in order.

A service keeps its migrations in a package (``…/storage/migrations``) with one folder per
dialect, ``sqlite/`` and ``postgresql/``, each holding ``NNNN_what_it_does.sql`` files with
the same versions. A file is plain DDL/DML separated by ``;`` at the end of a line, its
first line a ``-- description`` comment. Files are never edited once released: a migration
is what it created then, so a later change to a table is a new file (never a
``create_all`` of today's table definitions, which would change what an old migration
makes).

On start each service applies the versions its database has not recorded, each in its own
transaction, and records them in ``schema_migrations``. A database with versions it does not
know was migrated by a newer release, whose new tables the old code would not keep in step
(a job count, say): the service refuses to start on it. On PostgreSQL the whole run holds an
advisory lock, so replicas starting together apply each migration once; the others wait
(however long the migration takes: the wait is not bound by the sessions' ``lock_timeout``)
and then find nothing left to do.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import sqlalchemy as sa
from sqlalchemy.engine import Connection

logger = logging.getLogger(__name__)

# SQLAlchemy's dialect names; a migration has one file per dialect.
DIALECTS = ("sqlite", "postgresql")
_FILE_NAME = re.compile(r"(?P<version>\d{4})_(?P<slug>[a-z0-9_]+)\.sql")
# The table of applied versions; the same DDL on both databases (and what earlier releases
# created on SQLite).
_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER NOT NULL,
    description VARCHAR NOT NULL,
    applied_at FLOAT NOT NULL,
    PRIMARY KEY (version)
)
"""


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
            first = script.splitlines()[0] if script else ""
            description = first.removeprefix("--").strip() or match["slug"].replace("_", " ")
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


def _wait_for_lock(conn: Connection, key: int) -> None:
    """Take the session-level advisory lock ``key``, waiting for whoever holds it.

    The holder is another process migrating, and a migration may run for minutes (an index
    built on a large table): its lock is waited for however long, not for the sessions'
    ``lock_timeout``, which would fail this process's start while the other one is about to
    leave nothing to do. ``SET LOCAL``: only this transaction's; the migrations' own
    statements keep the timeout, so one blocked by a forgotten session fails rather than
    hangs."""
    parameters = {"key": key}
    if not conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), parameters).scalar_one():
        logger.info("waiting for another process to finish migrating this database")
        started = time.monotonic()
        conn.execute(sa.text("SET LOCAL lock_timeout = 0"))
        conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), parameters)
        logger.info("the other process's migration ended after %.1f s", time.monotonic() - started)
    # Ends the transaction (and the SET LOCAL); the lock is the session's, held until unlocked.
    conn.commit()


class SchemaTooNew(RuntimeError):
    """The database holds migrations of a newer release than this one (the service cannot
    start on it)."""


def lock_key(name: str) -> int:
    """A stable 32-bit key for ``pg_advisory_lock`` from a name."""
    return zlib.crc32(name.encode())


def apply_migrations(
    conn: Connection, migrations: Sequence[Migration], *, lock_name: str
) -> list[int]:
    """Apply every migration not yet recorded on ``conn``; the versions applied.

    ``conn`` must not be in a transaction. On PostgreSQL the run holds the advisory lock
    named ``lock_name`` (the service's name: one database per service).
    """
    dialect = conn.dialect.name
    locked = dialect == "postgresql"
    if locked:
        _wait_for_lock(conn, lock_key(lock_name))
    try:
        with conn.begin():
            conn.execute(sa.text(_MIGRATIONS_TABLE))
            applied = set(conn.execute(sa.text("SELECT version FROM schema_migrations")).scalars())
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
                        "INSERT INTO schema_migrations (version, description, applied_at) "
                        "VALUES (:version, :description, :applied_at)"
                    ),
                    {
                        "version": migration.version,
                        "description": migration.description,
                        "applied_at": time.time(),
                    },
                )
            done.append(migration.version)
            logger.info("applied schema migration %d: %s", migration.version, migration.description)
        return done
    finally:
        if locked:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": lock_key(lock_name)})
            conn.commit()
