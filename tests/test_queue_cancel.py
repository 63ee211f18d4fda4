"""A claim cancelled while its transaction runs (a worker stopped at the end of the drain)
gives the job back instead of leaving it leased to a worker that is gone."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from analysis_service.config import RetryPolicy
from analysis_service.domain.hub import StatusHub
from analysis_service.domain.models import JobSpec, JobStatus
from analysis_service.domain.queue import JobQueue
from analysis_service.storage.queue_store import SqlQueueStore
from analysis_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from mediatag_common.database import Database, sqlite_url
from tests.conftest import PATIENCE


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[JobQueue]:
    db = Database(sqlite_url(str(tmp_path / "analysis.db")), synchronous="NORMAL")
    await db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    hub = StatusHub(buffer_size=64, max_watchers=8)
    job_queue = JobQueue(SqlQueueStore(db, committed=hub.publish), hub, RetryPolicy(), 30.0)
    await job_queue.load()
    yield job_queue
    await db.close()


def spec(number: int) -> JobSpec:
    media_id = f"media-{number}"
    return JobSpec(
        media_id=media_id,
        owner_id="owner",
        sha256=hashlib.sha256(media_id.encode()).hexdigest(),
        size_bytes=1000,
        content_type="image/jpeg",
        content_ref=media_id,
    )


async def test_a_claim_cancelled_while_its_transaction_runs_gives_the_job_back(
    queue: JobQueue, tmp_path: Path
) -> None:
    await queue.submit([spec(1)])
    loop = asyncio.get_running_loop()
    claim_writes = asyncio.Event()

    def on_statement(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        # On the database thread: the claim's transaction now begins (a write transaction
        # asks for the write lock as it begins).
        if statement.lstrip().upper().startswith("BEGIN IMMEDIATE"):
            loop.call_soon_threadsafe(claim_writes.set)

    # Another writer holds SQLite's write lock, so the claim's transaction, once taken up by
    # the database thread, blocks as it begins (busy timeout) until the lock is released.
    blocker = sqlite3.connect(tmp_path / "analysis.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    sa.event.listen(Engine, "before_cursor_execute", on_statement)
    try:
        claim = asyncio.create_task(queue.claim())
        try:
            # Cancelled before the thread takes the transaction up, the claim would never run
            # and this test would exercise nothing: wait until it is running, then cancel.
            await asyncio.wait_for(claim_writes.wait(), PATIENCE)
            claim.cancel()
        finally:
            blocker.execute("COMMIT")
            blocker.close()
        with pytest.raises(asyncio.CancelledError):
            await claim
    finally:
        # Only once the transaction is over: the database thread reads the listeners.
        sa.event.remove(Engine, "before_cursor_execute", on_statement)

    # The transaction committed the claim after the caller had gone; the job was given back.
    job = await queue.get("media-1", with_embedding=False)
    assert job is not None
    assert job.status is JobStatus.PENDING
    assert job.attempt == 0
    assert [attempt.outcome for attempt in job.attempts] == ["RELEASED"]
    claimed = await queue.claim()
    assert claimed is not None
    assert claimed.spec.media_id == "media-1"
