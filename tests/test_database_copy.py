"""Moving from SQLite to PostgreSQL with ``mediatag copy-database``: the services, started on
the copies, answer as before and carry on where they were; refusals leave nothing half done."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.ingest.v1 import ingest_pb2 as ipb
from sqlalchemy.engine import make_url

from analysis_service.errors import PermanentAnalyzerError, TransientAnalyzerError
from analysis_service.storage import schema as analysis_schema
from mediatag_cli.database_copy import SCHEMAS
from mediatag_common.database import Database, database_url, sqlite_url
from mediatag_common.database_copy import CopyRefused, copy_database
from tests.conftest import PATIENCE, Cluster, DatabaseUrls, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.ingest_support import sha256_of
from tests.postgres import PostgresServer
from tests.processes import MEDIATAG, run_cli
from tests.test_pipeline import image_files, upload, wait_terminal

OWNER = "listing-1"


@pytest.fixture
def new_postgres(postgres: PostgresServer, tmp_path: Path) -> Iterator[DatabaseUrls]:
    """Fresh PostgreSQL databases (``new_postgres.new(name)``), dropped after the test."""
    urls = DatabaseUrls("postgresql", tmp_path, postgres)
    yield urls
    for url in urls.made:
        postgres.drop_database(url)


async def _list_media(cluster: Cluster, page_token: str = "", page_size: int = 100) -> Any:
    return await cluster.ingest.ListMedia(
        ipb.ListMediaRequest(
            owner_id=OWNER, view=ipb.MEDIA_VIEW_FULL, page_size=page_size, page_token=page_token
        ),
        timeout=PATIENCE,
    )


async def _list_jobs(cluster: Cluster) -> list[apb.Job]:
    response = await cluster.analysis.ListJobs(
        apb.ListJobsRequest(view=apb.JOB_VIEW_FULL, page_size=1000), timeout=PATIENCE
    )
    return list(response.jobs)


async def _changes(cluster: Cluster, after: int, through: int) -> list[apb.WatchStatusResponse]:
    """Every change a watcher resuming after revision ``after`` receives, up to ``through``."""
    call = cluster.analysis.WatchStatus(apb.WatchStatusRequest(start_revision=after))
    received: list[apb.WatchStatusResponse] = []
    try:
        async with asyncio.timeout(60):
            async for response in call:
                if response.WhichOneof("event") == "change":
                    received.append(response)
                    if response.revision >= through:
                        return received
    finally:
        call.cancel()
    raise AssertionError("the watch ended early")


async def _current_revision(cluster: Cluster) -> int:
    status = await cluster.analysis.GetQueueStatus(apb.GetQueueStatusRequest(), timeout=PATIENCE)
    return int(status.current_revision)


def _attempt_ids(url: str) -> list[int]:
    engine = sa.create_engine(database_url(url))
    try:
        with engine.connect() as conn:
            attempts = analysis_schema.attempts
            return list(conn.execute(sa.select(attempts.c.id).order_by(attempts.c.id)).scalars())
    finally:
        engine.dispose()


async def _analysis_database(path: Path, events: int = 0) -> None:
    """A migrated analysis database at ``path`` holding ``events`` status events."""
    schema = SCHEMAS["analysis"]
    path.parent.mkdir(parents=True, exist_ok=True)
    database = Database(sqlite_url(str(path)))
    await database.migrate(schema.migrations, lock_name=schema.lock_name)
    await database.close()
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO events (revision, media_id, owner_id, status, attempt, event_time, "
                "reused, error_message) VALUES (?, ?, 'o', 'COMPLETED', 1, 0, 0, ?)",
                ((revision, f"m{revision % 500}", "x" * 200) for revision in range(1, events + 1)),
            )
    finally:
        conn.close()


def _copy(service: str, root: Path, destination: str) -> tuple[int, str, str]:
    done = run_cli("copy-database", service, "--data-dir", str(root), "--to", destination)
    return done.returncode, done.stdout, done.stderr


async def test_services_moved_to_postgresql_answer_as_before_and_carry_on(
    make_cluster: Callable[..., Cluster],
    new_postgres: DatabaseUrls,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A real data set: made by the services on SQLite, a retry and a failure among it.
    files = image_files(5)
    broken, flaky = sha256_of(files[0].content), sha256_of(files[1].content)
    analyzer = ScriptedAnalyzer(
        fail_always={broken: PermanentAnalyzerError("cannot decode", reason="UNDECODABLE")},
        failures={flaky: [TransientAnalyzerError("upstream 503")]},
    )
    cluster = make_cluster(analyzer=analyzer)
    await cluster.start_analysis()
    await cluster.start_ingest()
    uploaded = await upload(cluster, files, owner=OWNER)
    done = await wait_terminal(cluster, [m.id for m in uploaded.media])
    assert sorted(m.status for m in done) == sorted(
        [ipb.PROCESSING_STATUS_FAILED] + [ipb.PROCESSING_STATUS_COMPLETED] * 4
    )
    media = list((await _list_media(cluster)).media)
    jobs = await _list_jobs(cluster)
    first_page = await _list_media(cluster, page_size=2)
    second_page = list((await _list_media(cluster, first_page.next_page_token, 2)).media)
    last = await _current_revision(cluster)
    # A watcher's place, taken before the move, and what it received after it.
    place = last // 2
    after_place = await _changes(cluster, place, last)
    await cluster.stop_ingest()
    await cluster.stop_analysis()
    assert cluster.analysis_config is not None
    assert cluster.ingest_config is not None
    old_attempts = _attempt_ids(cluster.analysis_config.resolved_database_url)

    analysis_url, ingest_url = new_postgres.new("analysis"), new_postgres.new("ingest")
    status, out, err = await asyncio.to_thread(_copy, "analysis", cluster.root, analysis_url)
    assert status == 0, err
    assert re.search(rf"job_attempts +{len(old_attempts)} row\(s\)  \(next id \d+\)", out)
    status, out, err = await asyncio.to_thread(_copy, "ingest", cluster.root, ingest_url)
    assert status == 0, err
    assert re.search(rf"media +{len(media)} row\(s\)", out)

    # Copying again would merge: refused, and the first copy stays as it was.
    status, out, err = await asyncio.to_thread(_copy, "ingest", cluster.root, ingest_url)
    assert status == 1
    assert re.search(r"nothing copied: the destination's table \w+ holds \d+ row\(s\)", err)

    caplog.clear()
    cluster.analysis_config = replace(cluster.analysis_config, database_url=analysis_url)
    cluster.ingest_config = replace(cluster.ingest_config, database_url=ingest_url)
    await cluster.start_analysis()
    await cluster.start_ingest()

    assert list((await _list_media(cluster)).media) == media
    assert await _list_jobs(cluster) == jobs
    # A page token handed out before the move still turns the page.
    assert list((await _list_media(cluster, first_page.next_page_token, 2)).media) == second_page
    assert await _current_revision(cluster) == last
    assert await _changes(cluster, place, last) == after_place

    # New work continues the revisions and the attempt ids.
    again = await upload(cluster, image_files(1, first_seed=10), owner=OWNER)
    (new_item,) = await wait_terminal(cluster, [again.media[0].id])
    assert new_item.status == ipb.PROCESSING_STATUS_COMPLETED
    following = await _changes(cluster, last, last + 3)
    assert [r.revision for r in following] == [last + 1, last + 2, last + 3]
    assert {r.change.media_id for r in following} == {new_item.id}
    new_attempts = _attempt_ids(analysis_url)[len(old_attempts) :]
    assert new_attempts
    assert min(new_attempts) > max(old_attempts)
    # ... without a refused claim on the way (ids the copy took, say).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    await cluster.stop_ingest()
    await cluster.stop_analysis()


async def test_a_source_newer_than_this_release_is_refused_and_nothing_is_written(
    tmp_path: Path, new_postgres: DatabaseUrls
) -> None:
    schema = SCHEMAS["analysis"]
    source_path = tmp_path / "analysis.db"
    source = Database(sqlite_url(str(source_path)))
    await source.migrate(schema.migrations, lock_name=schema.lock_name)
    await source.close()
    newer = len(schema.migrations) + 1
    with sqlite3.connect(source_path) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) "
            "VALUES (?, 'from a later release', 0)",
            (newer,),
        )
    destination = new_postgres.new("destination")

    with pytest.raises(CopyRefused, match=f"schema version {newer}, newer than {newer - 1}"):
        await copy_database(schema, sqlite_url(str(source_path)), destination)

    engine = sa.create_engine(database_url(destination))
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


@pytest.mark.parametrize(("service", "other"), [("analysis", "ingest"), ("ingest", "analysis")])
async def test_a_copy_naming_the_other_services_database_is_refused_as_such(
    tmp_path: Path, new_postgres: DatabaseUrls, service: str, other: str
) -> None:
    # Ingest has more versions than analysis: its database once read as "newer".
    urls = {}
    for name in (service, other):
        urls[name] = sqlite_url(str(tmp_path / f"{name}.db"))
        database = Database(urls[name])
        await database.migrate(SCHEMAS[name].migrations, lock_name=SCHEMAS[name].lock_name)
        await database.close()
    belongs = f"belongs to the {SCHEMAS[other].lock_name} service"

    with pytest.raises(CopyRefused, match=f"the source .*: the database {belongs}"):
        await copy_database(SCHEMAS[service], urls[other], new_postgres.new("destination"))
    with pytest.raises(CopyRefused, match=f"the destination .*: the database {belongs}"):
        await copy_database(SCHEMAS[service], urls[service], urls[other])


async def test_a_copy_from_the_database_of_a_running_analysis_service_is_refused(
    tmp_path: Path, new_postgres: DatabaseUrls
) -> None:
    schema = SCHEMAS["analysis"]
    source_path = tmp_path / "analysis" / "analysis.db"
    source_path.parent.mkdir()
    # What `mediatag serve analysis` holds while it runs on SQLite.
    running = Database(sqlite_url(str(source_path)), sole_process=True)
    await running.migrate(schema.migrations, lock_name=schema.lock_name)
    destination = new_postgres.new("destination")
    try:
        status, _, err = _copy("analysis", tmp_path, destination)
    finally:
        await running.close()

    assert status == 1
    assert f"nothing copied: the analysis service (pid {os.getpid()}) is running on" in err
    assert "stop it first" in err
    engine = sa.create_engine(database_url(destination))
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    # Stopped, it may be copied.
    status, out, _ = _copy("analysis", tmp_path, destination)
    assert status == 0, out
    assert "copied the analysis database" in out


def test_a_missing_source_is_a_usage_error(tmp_path: Path) -> None:
    status, _, err = _copy("analysis", tmp_path, sqlite_url(str(tmp_path / "to.db")))
    assert status == 2
    assert f"no analysis database at {tmp_path / 'analysis' / 'analysis.db'}" in err
    assert not (tmp_path / "analysis" / "analysis.db").exists()


def test_an_unsupported_destination_is_a_usage_error(tmp_path: Path) -> None:
    status, _, err = _copy("ingest", tmp_path, "mysql://db/mediatag")
    assert status == 2
    assert "unsupported database URL scheme 'mysql'" in err


# Events enough for the copy to be busy with them for a good while (seconds), so that an
# interrupt sent once it is seen writing them arrives before it is done.
MANY_EVENTS = 100_000


@pytest.mark.e2e
async def test_ctrl_c_stops_a_copy_which_commits_nothing_and_can_then_run_again(
    tmp_path: Path, new_postgres: DatabaseUrls
) -> None:
    await _analysis_database(tmp_path / "analysis" / "analysis.db", events=MANY_EVENTS)
    destination = new_postgres.new("destination")
    watcher = sa.create_engine(database_url(destination))
    copying = await asyncio.create_subprocess_exec(
        *(MEDIATAG, "copy-database", "analysis", "--data-dir", str(tmp_path), "--to", destination),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )

    async def writing_events() -> bool:
        # Its rows are not to be seen before the commit; its session's statement is.
        if copying.returncode is not None:
            _, err = await copying.communicate()
            raise AssertionError(f"the copy ended before it was interrupted: {err.decode()}")
        with watcher.connect() as conn:
            sessions = conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND query LIKE 'INSERT INTO events (%'"
                )
            ).scalar_one()
        return bool(sessions)

    try:
        await wait_until(writing_events)
        copying.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(copying.communicate(), PATIENCE)
        with watcher.connect() as conn:
            events = sa.select(sa.func.count()).select_from(analysis_schema.events)
            events_copied = conn.execute(events).scalar_one()
    finally:
        watcher.dispose()
        if copying.returncode is None:
            copying.kill()
            await copying.wait()

    assert copying.returncode == 130, err
    assert (out, err) == (b"", b"interrupted: nothing was copied\n")
    assert events_copied == 0
    status, again, err_again = await asyncio.to_thread(_copy, "analysis", tmp_path, destination)
    assert status == 0, err_again
    assert re.search(rf"events +{MANY_EVENTS:,} row\(s\)", again)


@pytest.mark.e2e
async def test_one_sqlite_file_named_relatively_and_absolutely_is_the_same_database(
    tmp_path: Path,
) -> None:
    source = tmp_path / "analysis" / "analysis.db"
    await _analysis_database(source)
    # --data-dir . names it relative to the working directory, --to by its absolute path.
    done = await asyncio.to_thread(
        subprocess.run,
        [MEDIATAG, "copy-database", "analysis", "--data-dir", ".", "--to", sqlite_url(str(source))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr == "nothing copied: the source and the destination are the same database\n"


@pytest.mark.e2e
async def test_the_destination_is_shown_with_a_password_hidden_only_if_it_has_one(
    tmp_path: Path, new_postgres: DatabaseUrls
) -> None:
    await _analysis_database(tmp_path / "analysis" / "analysis.db")
    destination = make_url(new_postgres.new("destination"))
    # The test server's URL has an empty password (a throwaway server) or a real one.
    shown = (
        destination.render_as_string(hide_password=True)
        if destination.password
        else destination.render_as_string(hide_password=False).replace(":@", "@", 1)
    )
    status, out, err = await asyncio.to_thread(
        _copy, "analysis", tmp_path, destination.render_as_string(hide_password=False)
    )
    assert status == 0, err
    assert f" into {shown}\n" in out
    assert f"--analysis-database-url {shown} (or" in out
