"""Versioned migrations on SQLite and PostgreSQL: what they create is what the queries expect,
they apply once when replicas start together (however long one takes), and data made by
earlier releases is kept."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.synchronize
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from analysis_service.storage import schema as analysis_schema
from ingest_service.storage import schema as ingest_schema
from mediatag_common import database
from mediatag_common.database import Database, database_url
from mediatag_common.keys import load_or_create_key
from mediatag_common.migrations import (
    Migration,
    SchemaTooNew,
    apply_migrations,
    load_migrations,
    lock_key,
)
from tests.conftest import DatabaseUrls, free_port, wait_until
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
        migrating.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": lock_key(lock)})
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
        migrating.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": lock_key(lock)})
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
