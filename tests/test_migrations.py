"""Versioned migrations on SQLite and PostgreSQL: what they create is what the queries expect,
they apply once when processes start together (however long one takes), a database is one
service's, and data made by earlier releases is kept."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.synchronize
import queue
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from analysis_service.storage import schema as analysis_schema
from ingest_service.storage import schema as ingest_schema
from mediatag_common import database
from mediatag_common.database import Database, database_url, sqlite_url
from mediatag_common.keys import load_or_create_key
from mediatag_common.migrations import (
    DIALECTS,
    MIGRATIONS_LOCK_KEY,
    AnotherServicesDatabase,
    Migration,
    SchemaTooNew,
    apply_migrations,
    load_migrations,
    migration_lock,
)
from tests.conftest import PATIENCE, DatabaseUrls, free_port, wait_until
from tests.processes import run_cli

SERVICES = {
    "analysis": (analysis_schema.metadata, analysis_schema.MIGRATIONS, "mediatag-analysis"),
    "ingest": (ingest_schema.metadata, ingest_schema.MIGRATIONS, "mediatag-ingest"),
}


def _columns(engine: sa.Engine, table: str) -> dict[str, bool]:
    """Column name -> nullable, as the database has it."""
    return {c["name"]: bool(c["nullable"]) for c in sa.inspect(engine).get_columns(table)}


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_migrations_create_the_tables_the_queries_use(
    databases: DatabaseUrls, service: str
) -> None:
    metadata, migrations, lock = SERVICES[service]
    db = Database(databases.new(service))
    try:
        await db.migrate(migrations, lock_name=lock)
        engine = db.engine
        present = set(sa.inspect(engine).get_table_names())
        for table in metadata.sorted_tables:
            assert table.name in present, f"no migration creates {table.name}"
            expected = {c.name: bool(c.nullable) for c in table.columns}
            assert _columns(engine, table.name) == expected, table.name
            primary = sa.inspect(engine).get_pk_constraint(table.name)["constrained_columns"]
            assert primary == [c.name for c in table.primary_key.columns], table.name
            indexes = {i["name"] for i in sa.inspect(engine).get_indexes(table.name)}
            assert {i.name for i in table.indexes} <= indexes, table.name
        assert present - {t.name for t in metadata.sorted_tables} == {
            "schema_migrations",
            "secrets",
        }
        versions = await db.read(
            lambda conn: list(conn.execute(sa.text("SELECT version FROM schema_migrations")))
        )
        assert sorted(v for (v,) in versions) == [m.version for m in migrations]
    finally:
        await db.close()


async def test_an_older_release_refuses_a_database_a_newer_one_migrated(
    databases: DatabaseUrls,
) -> None:
    """The previous release, started on a database the current one migrated, would write
    jobs without keeping the newer tables in step: it refuses, and changes nothing."""
    db = Database(databases.new("analysis"))
    try:
        await db.migrate(analysis_schema.MIGRATIONS, lock_name="mediatag-analysis")
        previous_release = analysis_schema.MIGRATIONS[:-1]
        newest = analysis_schema.MIGRATIONS[-1].version
        with pytest.raises(SchemaTooNew, match=rf"schema versions {newest} are unknown"):
            await db.migrate(previous_release, lock_name="mediatag-analysis")
        versions = await db.read(
            lambda conn: list(conn.execute(sa.text("SELECT version FROM schema_migrations")))
        )
        assert sorted(v for (v,) in versions) == [m.version for m in analysis_schema.MIGRATIONS]
    finally:
        await db.close()


@pytest.mark.e2e
async def test_mediatag_serve_says_why_it_will_not_start_on_a_newer_database(
    tmp_path: Path,
) -> None:
    database = tmp_path / "analysis" / "analysis.db"
    database.parent.mkdir()
    db = Database(f"sqlite:///{database}")
    await db.migrate(analysis_schema.MIGRATIONS, lock_name="mediatag-analysis")
    await db.close()
    with sqlite3.connect(database) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) "
            "VALUES (999, 'a later release', 0)"
        )
    port = str(free_port())
    done = run_cli("serve", "analysis", "--data-dir", str(tmp_path), "--analysis-port", port)
    assert done.returncode == 1, done.stderr
    assert "cannot start: the database was migrated by a newer release" in done.stderr
    assert "versions 999 are unknown" in done.stderr


def test_every_migration_exists_for_both_databases() -> None:
    for _, migrations, _ in SERVICES.values():
        assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
        for migration in migrations:
            assert set(migration.statements) == {"sqlite", "postgresql"}
            assert all(migration.statements.values()), migration


async def test_a_database_of_an_earlier_release_keeps_its_data(tmp_path: Path) -> None:
    """An SQLite file made by the first migration alone (what earlier releases created)
    gets only the later ones, and keeps its rows."""
    path = tmp_path / "analysis.db"
    first: list[Migration] = [analysis_schema.MIGRATIONS[0]]
    db = Database(f"sqlite:///{path}")
    await db.migrate(first, lock_name="mediatag-analysis")
    await db.write(
        lambda conn: conn.execute(sa.text("UPDATE counters SET value = 41 WHERE name = 'revision'"))
    )
    await db.migrate(analysis_schema.MIGRATIONS, lock_name="mediatag-analysis")
    await db.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM counters WHERE name = 'revision'").fetchone() == (
            41,
        )
        applied = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
    assert applied == [m.version for m in analysis_schema.MIGRATIONS]


def _migrate_in_process(
    url: str,
    start: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue[list[int] | str],
) -> None:
    engine = sa.create_engine(database_url(url))
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            conn.rollback()
            # Connected and ready: all three start migrating at the same moment.
            start.wait(60)
            migrations = load_migrations("analysis_service.storage.migrations")
            results.put(apply_migrations(conn, migrations, lock_name="race"))
    except Exception as exc:
        results.put(repr(exc))
    finally:
        engine.dispose()


def test_three_processes_migrating_at_once_apply_each_migration_once(postgres_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    results: multiprocessing.Queue[list[int] | str] = context.Queue()
    processes = [
        context.Process(target=_migrate_in_process, args=(postgres_url, start, results))
        for _ in range(3)
    ]
    for process in processes:
        process.start()
    applied = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    everything = [m.version for m in analysis_schema.MIGRATIONS]
    # One process applied them all; the others waited for the lock and found nothing to do.
    assert sorted(applied, key=len) == [[], [], everything]
    engine = sa.create_engine(database_url(postgres_url))
    with engine.connect() as conn:
        rows = list(conn.execute(sa.text("SELECT version FROM schema_migrations")))
    engine.dispose()
    assert sorted(v for (v,) in rows) == everything


# How long the session waiting on an advisory lock in this database has been waiting, if one is.
_WAITING_FOR_ADVISORY_LOCK = sa.text(
    """
    SELECT EXTRACT(EPOCH FROM clock_timestamp() - activity.query_start)
    FROM pg_locks AS lock JOIN pg_stat_activity AS activity ON activity.pid = lock.pid
    WHERE lock.locktype = 'advisory' AND NOT lock.granted
      AND lock.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    """
)


async def test_a_replica_waits_for_a_migration_longer_than_the_lock_timeout(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica starting while another migrates (an index built on a large table, say) for
    longer than the sessions' ``lock_timeout`` waits, then applies nothing twice; its
    sessions keep their ``lock_timeout`` for the rest."""
    # 0.2 s here rather than 30 s: the migration below outlasts it many times over.
    monkeypatch.setattr(database, "_PG_SESSION_OPTIONS", "-c lock_timeout=200")
    caplog.set_level(logging.INFO, logger="mediatag_common.migrations")
    migrations, lock = ingest_schema.MIGRATIONS, ingest_schema.MIGRATIONS_LOCK
    first = Database(postgres_url)
    second = Database(postgres_url)
    migrating = first.engine.connect()
    try:
        # The first replica is migrating: it holds the lock as a run does.
        migrating.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATIONS_LOCK_KEY})
        migrating.commit()

        def start(conn: Connection) -> tuple[list[int], str]:
            applied = apply_migrations(conn, migrations, lock_name=lock)
            return applied, str(conn.execute(sa.text("SHOW lock_timeout")).scalar_one())

        starting = asyncio.create_task(asyncio.to_thread(second.run_sync, start))

        async def waited_well_past_the_timeout() -> bool:
            if starting.done():
                raise AssertionError(f"the second replica did not wait: {starting.exception()!r}")
            waited = await first.read(lambda c: c.execute(_WAITING_FOR_ADVISORY_LOCK).scalar())
            return waited is not None and float(waited) > 1.0

        await wait_until(waited_well_past_the_timeout)
        assert "waiting for another process to finish migrating" in caplog.text

        applied = await asyncio.to_thread(apply_migrations, migrating, migrations, lock_name=lock)
        assert applied == [m.version for m in migrations]
        migrating.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATIONS_LOCK_KEY})
        migrating.commit()
        assert await starting == ([], "200ms")
    finally:
        migrating.close()
        await first.close()
        await second.close()


async def test_a_stored_key_is_made_once_and_shared(databases: DatabaseUrls) -> None:
    url = databases.new("keys")
    first = Database(url)
    second = Database(url)
    try:
        await first.migrate(analysis_schema.MIGRATIONS, lock_name="mediatag-analysis")
        keys = await asyncio.gather(
            *(
                db.write(lambda conn: load_or_create_key(conn, "page-token"))
                for db in (first, second, first, second)
            )
        )
        assert len(set(keys)) == 1
        assert len(keys[0]) == 32
        other = await first.write(lambda conn: load_or_create_key(conn, "other"))
        assert other != keys[0]
    finally:
        await first.close()
        await second.close()


class _LogEvents(logging.Handler):
    """Puts each message logged into ``events``, for the test process to read."""

    def __init__(self, events: multiprocessing.Queue[tuple[str, str]]) -> None:
        super().__init__()
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        self._events.put(("log", record.getMessage()))


def _start_ingest_on(
    urls: list[str],
    start: multiprocessing.synchronize.Barrier,
    events: multiprocessing.Queue[tuple[str, str]],
    busy_timeout_ms: int,
) -> None:
    """In a process of its own: migrate each of ``urls`` as ``mediatag serve ingest`` does at
    start, together with the other processes (``start``). Each message logged, each start and
    each outcome (``migrated`` or ``failed``) goes to ``events``."""
    database.SQLITE_BUSY_TIMEOUT_MS = busy_timeout_ms
    migrations_logger = logging.getLogger("mediatag_common.migrations")
    migrations_logger.setLevel(logging.INFO)
    migrations_logger.addHandler(_LogEvents(events))

    async def migrate(url: str) -> None:
        db = Database(url)
        try:
            await db.migrate(ingest_schema.MIGRATIONS, lock_name=ingest_schema.MIGRATIONS_LOCK)
        finally:
            await db.close()

    for url in urls:
        start.wait(PATIENCE)
        events.put(("starting", url))
        try:
            asyncio.run(migrate(url))
        except Exception as exc:
            events.put(("failed", f"{url}: {exc!r}"))
        else:
            events.put(("migrated", url))


_OUTCOMES = ("migrated", "failed")


class _IngestProcesses:
    """``count`` processes running :func:`_start_ingest_on`, and what they tell."""

    def __init__(self, count: int, urls: list[str], busy_timeout_ms: int) -> None:
        context = multiprocessing.get_context("spawn")
        # Held here: a process unpickles the barrier once started (``start`` drops its
        # arguments), and the parent's must exist until then.
        self._start = context.Barrier(count)
        self.events: multiprocessing.Queue[tuple[str, str]] = context.Queue()
        self.processes = [
            context.Process(
                target=_start_ingest_on, args=(urls, self._start, self.events, busy_timeout_ms)
            )
            for _ in range(count)
        ]
        for process in self.processes:
            process.start()

    def stop(self) -> None:
        for process in self.processes:
            process.join(PATIENCE)
            if process.is_alive():
                process.kill()
                process.join()


def _versions(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return sorted(v for (v,) in conn.execute("SELECT version FROM schema_migrations"))


def test_processes_starting_together_on_one_sqlite_file_apply_each_migration_once(
    tmp_path: Path,
) -> None:
    """Several ingest processes on one SQLite file, started at the same moment (round after
    round, each on a new file): none fails, and each migration is applied once."""
    rounds, count = 10, 3
    paths = [tmp_path / f"ingest-{n}.db" for n in range(rounds)]
    ingest = _IngestProcesses(
        count, [sqlite_url(str(path)) for path in paths], database.SQLITE_BUSY_TIMEOUT_MS
    )
    try:
        outcomes: list[tuple[str, str]] = []
        applied = 0
        while len(outcomes) < rounds * count:
            kind, text = ingest.events.get(timeout=PATIENCE)
            if kind in _OUTCOMES:
                outcomes.append((kind, text))
            elif kind == "log":
                applied += text.startswith("applied schema migration")
    finally:
        ingest.stop()
    assert [text for kind, text in outcomes if kind == "failed"] == []
    assert applied == rounds * len(ingest_schema.MIGRATIONS)
    everything = [m.version for m in ingest_schema.MIGRATIONS]
    assert all(_versions(path) == everything for path in paths)


async def test_a_process_waits_for_an_sqlite_migration_longer_than_the_busy_timeout(
    tmp_path: Path,
) -> None:
    """Processes starting while another migrates one SQLite file for longer than SQLite's
    busy timeout wait, say so, and then apply nothing twice."""
    path = tmp_path / "ingest.db"
    busy_timeout_ms = 100
    # A migration under way: its process holds the migrations' lock and SQLite's write lock.
    engine = sa.create_engine(database_url(sqlite_url(str(path))))
    migrating = sqlite3.connect(path, isolation_level=None)
    migrating.execute("PRAGMA journal_mode=WAL")
    migrating.execute("BEGIN IMMEDIATE")
    ingest: _IngestProcesses | None = None
    try:
        with engine.connect() as conn, migration_lock(conn):
            ingest = _IngestProcesses(2, [sqlite_url(str(path))], busy_timeout_ms)
            events = ingest.events
            waiting_since: list[float] = []

            async def waited_ten_busy_timeouts() -> bool:
                while True:
                    try:
                        kind, text = events.get_nowait()
                    except queue.Empty:
                        break
                    if kind in _OUTCOMES:
                        raise AssertionError(f"a process did not wait: {kind} {text}")
                    if kind == "log" and text.startswith(
                        "waiting for another process to finish migrating"
                    ):
                        waiting_since.append(time.monotonic())
                return (
                    len(waiting_since) == len(ingest.processes)
                    and time.monotonic() - max(waiting_since) > 10 * busy_timeout_ms / 1000
                )

            await wait_until(waited_ten_busy_timeouts)
            migrating.execute("ROLLBACK")
        outcomes: list[tuple[str, str]] = []
        logged: list[str] = []
        while len(outcomes) < len(ingest.processes):
            kind, text = events.get(timeout=PATIENCE)
            if kind in _OUTCOMES:
                outcomes.append((kind, text))
            elif kind == "log":
                logged.append(text)
    finally:
        migrating.close()
        engine.dispose()
        if ingest is not None:
            ingest.stop()
    assert [kind for kind, _ in outcomes] == ["migrated", "migrated"]
    # One applied every migration once the lock was free; the other then found none left.
    applied = [text for text in logged if text.startswith("applied schema migration")]
    assert len(applied) == len(ingest_schema.MIGRATIONS)
    assert sum(text.startswith("the other process's migration ended") for text in logged) == 2
    assert _versions(path) == [m.version for m in ingest_schema.MIGRATIONS]


async def test_a_process_opening_a_new_sqlite_file_waits_for_another_switching_it_to_wal(
    tmp_path: Path,
) -> None:
    """Processes opening a new SQLite file together each switch it to WAL, and SQLite refuses
    the switch at once, without its busy timeout, while another connection writes to the file
    before switching it: the process waits, then starts."""
    path = tmp_path / "ingest.db"
    # Another process's connection to the new file, writing before its switch to WAL.
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    ingest = _IngestProcesses(1, [sqlite_url(str(path))], database.SQLITE_BUSY_TIMEOUT_MS)
    try:
        started: list[float] = []

        async def kept_trying() -> bool:
            while True:
                try:
                    kind, text = ingest.events.get_nowait()
                except queue.Empty:
                    break
                if kind in _OUTCOMES:
                    raise AssertionError(f"the process did not wait: {kind} {text}")
                if kind == "starting":
                    started.append(time.monotonic())
            # Long past its switch (a few milliseconds after it starts), well within the timeout.
            return bool(started) and time.monotonic() - started[0] > 0.5

        await wait_until(kept_trying)
        other.execute("ROLLBACK")
        outcome = ingest.events.get(timeout=PATIENCE)
        while outcome[0] not in _OUTCOMES:
            outcome = ingest.events.get(timeout=PATIENCE)
    finally:
        other.close()
        ingest.stop()
    assert outcome == ("migrated", sqlite_url(str(path)))
    assert _versions(path) == [m.version for m in ingest_schema.MIGRATIONS]


def _the_other(service: str) -> str:
    return next(other for other in SERVICES if other != service)


async def _tables_and_recorded_migrations(db: Database) -> tuple[list[str], list[tuple[Any, ...]]]:
    def read(conn: Connection) -> tuple[list[str], list[tuple[Any, ...]]]:
        rows = conn.execute(sa.text("SELECT * FROM schema_migrations"))
        return sorted(sa.inspect(conn).get_table_names()), sorted(tuple(row) for row in rows)

    return await db.read(read)


@pytest.mark.parametrize("owner", sorted(SERVICES))
async def test_a_service_refuses_the_database_of_the_other_one(
    databases: DatabaseUrls, owner: str
) -> None:
    """Their versions overlap: without knowing whose the database is, ingest would take
    analysis's versions for its own, and analysis would take ingest's for a newer release."""
    other = _the_other(owner)
    _, owner_migrations, owner_name = SERVICES[owner]
    _, other_migrations, other_name = SERVICES[other]
    db = Database(databases.new("shared"))
    try:
        await db.migrate(owner_migrations, lock_name=owner_name)
        before = await _tables_and_recorded_migrations(db)
        with pytest.raises(
            AnotherServicesDatabase,
            match=f"belongs to the {owner_name} service, not to {other_name}: each service "
            "needs a database of its own",
        ):
            await db.migrate(other_migrations, lock_name=other_name)
        assert await _tables_and_recorded_migrations(db) == before
    finally:
        await db.close()


def _migrate_as_an_earlier_release(migrations: Sequence[Migration]) -> Callable[[Connection], None]:
    """What earlier releases did: the same statements, each version recorded without the
    service that applied it."""

    def migrate(conn: Connection) -> None:
        conn.execute(
            sa.text(
                "CREATE TABLE schema_migrations (version INTEGER NOT NULL, description VARCHAR "
                "NOT NULL, applied_at FLOAT NOT NULL, PRIMARY KEY (version))"
            )
        )
        for migration in migrations:
            for statement in migration.statements[conn.dialect.name]:
                conn.exec_driver_sql(statement)
            conn.execute(
                sa.text(
                    "INSERT INTO schema_migrations (version, description, applied_at) "
                    "VALUES (:version, :description, 0)"
                ),
                {"version": migration.version, "description": migration.description},
            )

    return migrate


@pytest.mark.parametrize("owner", sorted(SERVICES))
async def test_a_database_an_earlier_release_migrated_is_recognised_by_its_tables(
    databases: DatabaseUrls, owner: str
) -> None:
    """Earlier releases recorded no service: the database is the service's whose first
    tables it has; from then on its versions name it. An earlier release still records its
    versions as it did."""
    other = _the_other(owner)
    _, owner_migrations, owner_name = SERVICES[owner]
    _, other_migrations, other_name = SERVICES[other]
    db = Database(databases.new(owner))
    try:
        await db.write(_migrate_as_an_earlier_release(owner_migrations[:-1]))
        before = await _tables_and_recorded_migrations(db)
        with pytest.raises(
            AnotherServicesDatabase, match=f"belongs to another service, not to {other_name}"
        ):
            await db.migrate(other_migrations, lock_name=other_name)
        assert await _tables_and_recorded_migrations(db) == before
        await db.migrate(owner_migrations, lock_name=owner_name)
        versions = await db.read(
            lambda conn: list(
                conn.execute(sa.text("SELECT version, service FROM schema_migrations"))
            )
        )
        assert sorted(versions) == [(m.version, owner_name) for m in owner_migrations]
        # An earlier release still records a version as it did (the service is not needed).
        await db.write(
            lambda conn: conn.execute(
                sa.text(
                    "INSERT INTO schema_migrations (version, description, applied_at) "
                    "VALUES (99, 'by an earlier release', 0)"
                )
            )
        )
        with pytest.raises(AnotherServicesDatabase, match=f"belongs to the {owner_name} service"):
            await db.migrate(other_migrations, lock_name=other_name)
    finally:
        await db.close()


@pytest.mark.e2e
async def test_mediatag_serve_says_the_database_is_the_other_services(tmp_path: Path) -> None:
    shared = tmp_path / "shared.db"
    db = Database(sqlite_url(str(shared)))
    await db.migrate(analysis_schema.MIGRATIONS, lock_name=analysis_schema.MIGRATIONS_LOCK)
    await db.close()
    done = run_cli(
        "serve",
        "ingest",
        "--data-dir",
        str(tmp_path),
        "--ingest-port",
        str(free_port()),
        "--ingest-metrics-port",
        "off",
        "--ingest-database-url",
        sqlite_url(str(shared)),
    )
    assert done.returncode == 1, done.stderr
    assert (
        "cannot start: the database belongs to the mediatag-analysis service, not to "
        "mediatag-ingest" in done.stderr
    )


def test_a_description_is_the_first_paragraph_of_the_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "described_migrations"
    for dialect in DIALECTS:
        (package / dialect).mkdir(parents=True)
        (package / dialect / "0001_things.sql").write_text(
            "-- things: what the first line begins and\n"
            "-- the second line ends\n"
            "--\n"
            "-- Why, at length.\n"
            "SELECT 1;\n"
        )
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    (migration,) = load_migrations("described_migrations")
    assert migration.description == "things: what the first line begins and the second line ends"
    assert migration.statements == dict.fromkeys(DIALECTS, ("SELECT 1",))
