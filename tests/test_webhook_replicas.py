"""Webhooks sent by several ingest replicas on one PostgreSQL: an endpoint's
``--webhook-concurrency`` holds across them, and leases, retries and retry periods are
judged on the database's clock, whatever the replicas' own clocks say (one runs in a process
whose clock is ahead)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web

from ingest_service.domain.models import ProcessingStatus, StatusUpdate
from ingest_service.domain.observer import NoObserver
from ingest_service.domain.store import MirroredChange
from ingest_service.domain.webhook_endpoints import WebhookEndpoints
from ingest_service.domain.webhooks import DispatchLimits, RetryPolicy, WebhookDispatcher
from ingest_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK, webhook_deliveries
from ingest_service.storage.sql_deliveries import SqlDeliveryStore
from ingest_service.storage.sql_store import SqlIngestStore
from ingest_service.webhook_http import HttpWebhookSender
from mediatag_common.database import Database, database_now
from tests.conftest import free_port, wait_until
from tests.test_webhook_storage import insert_media
from tests.test_webhooks import endpoints_file

OWNER = "listing-7"
# Attempts are given this long; a claim's lease is 3 times that plus 10 s: 100 s.
TIMEOUT = 30.0
# A failed attempt is retried after 30 to 60 s (jittered), within an hour of the change.
POLICY = RetryPolicy(initial=60.0, maximum=60.0, period=3600.0)
# How far ahead the skewed replica's clock is: more than a lease.
SKEW = 150.0


class Receiver:
    """A webhook receiver that holds each request until the test lets it go (then accepts
    it), except those it answers at once with a status of ``answers``; counts each
    ``webhook-id`` it got, and the most requests it held at once."""

    def __init__(self) -> None:
        self.port = free_port()
        self.answers: dict[str, int] = {}
        self.received: Counter[str] = Counter()
        self.in_flight = 0
        self.peak = 0
        self._held: list[asyncio.Event] = []
        self._runner: web.AppRunner | None = None

    @property
    def holding(self) -> int:
        """Requests held and not yet let go."""
        return len(self._held)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def _handle(self, request: web.Request) -> web.Response:
        message_id = request.headers["webhook-id"]
        await request.read()
        self.received[message_id] += 1
        if message_id in self.answers:
            return web.Response(status=self.answers[message_id])
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        released = asyncio.Event()
        self._held.append(released)
        try:
            await released.wait()
        finally:
            self.in_flight -= 1
        return web.Response(status=200)

    def release_one(self) -> None:
        """Accept the request held longest."""
        self._held.pop(0).set()

    def release_all(self) -> None:
        while self._held:
            self.release_one()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.release_all()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    started = Receiver()
    await started.start()
    yield started
    await started.stop()


class Replica:
    """What an ingest replica runs for webhooks: its own connections, endpoints and sender."""

    def __init__(self, url: str, file: Path, *, concurrency: int) -> None:
        self.db = Database(url)
        self.endpoints = WebhookEndpoints(file, max_endpoints=4, reload_interval=5.0)
        self.endpoints.load()
        self.sender = HttpWebhookSender(timeout=TIMEOUT, max_connections=8)
        self.dispatcher = WebhookDispatcher(
            store=SqlDeliveryStore(self.db),
            sender=self.sender,
            endpoints=self.endpoints,
            policy=POLICY,
            # Polls often: a slot another replica frees is taken within moments.
            limits=DispatchLimits(concurrency=concurrency, timeout=TIMEOUT, poll_interval=0.05),
            observer=NoObserver(),
        )

    async def changed(self, media_ids: Sequence[str], first_revision: int) -> None:
        """Apply a COMPLETED change of each item, as the replica's status mirror does: a
        delivery for the endpoint with each."""
        hooks = list(self.endpoints.current.values())
        changes = [
            MirroredChange(
                StatusUpdate(
                    revision=first_revision + n,
                    media_id=media_id,
                    status=ProcessingStatus.COMPLETED,
                    attempt=1,
                    event_time=time.time(),
                ),
                hooks,
            )
            for n, media_id in enumerate(media_ids)
        ]
        await SqlIngestStore(self.db).apply_status_changes(changes, revision=None)

    async def close(self) -> None:
        await self.dispatcher.stop()
        await self.sender.close()
        await self.db.close()


async def migrated(url: str, media_ids: Sequence[str]) -> Database:
    db = Database(url)
    await db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    for media_id in media_ids:
        await db.write(partial(insert_media, media_id=media_id, owner_id=OWNER))
    return db


async def stored(db: Database) -> list[Any]:
    return list(await db.read(lambda conn: conn.execute(sa.select(webhook_deliveries)).all()))


async def test_an_endpoints_concurrency_holds_across_replicas(
    postgres_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    """Two replicas, each allowed 2 attempts in flight to the endpoint: the endpoint never
    has more than 2 at once, and gets each change once."""
    media_ids = [f"m{n}" for n in range(8)]
    db = await migrated(postgres_url, media_ids)
    file = endpoints_file(tmp_path / "hooks.toml", {"e": receiver.url})
    first = Replica(postgres_url, file, concurrency=2)
    second = Replica(postgres_url, file, concurrency=2)
    try:
        await first.changed(media_ids, first_revision=1)
        first.dispatcher.start()

        async def both_slots_taken() -> bool:
            return receiver.holding == 2

        # The first replica holds every slot when the second starts looking.
        await wait_until(both_slots_taken)
        second.dispatcher.start()
        for released in range(len(media_ids)):
            left = len(media_ids) - released

            async def slots_taken(left: int = left) -> bool:
                return receiver.holding >= min(2, left)

            await wait_until(slots_taken)
            receiver.release_one()

        async def all_delivered() -> bool:
            return not await stored(db)

        await wait_until(all_delivered)
        assert receiver.peak == 2
        assert receiver.received == Counter(
            {f"msg_{m}_{n + 1}": 1 for n, m in enumerate(media_ids)}
        )
    finally:
        receiver.release_all()
        await first.close()
        await second.close()
        await db.close()


def skewed_replica(arguments: Sequence[str]) -> None:
    """The second replica of the test below, in a process of its own whose clock (``time``)
    is off: it applies a change of ``media_id`` (so enqueues its delivery), then sends
    webhooks until its standard input closes."""
    url, file, media_id = arguments

    async def run() -> None:
        replica = Replica(url, Path(file), concurrency=3)
        try:
            await replica.changed([media_id], first_revision=2)
            replica.dispatcher.start()
            await asyncio.to_thread(sys.stdin.read)
        finally:
            await replica.close()

    asyncio.run(run())


# Sets this process's clock ahead before anything reads it, then runs skewed_replica.
_SKEWED_PROCESS = """
import sys, time
_clock = time.time
time.time = lambda: _clock() + float(sys.argv[1])
from tests.test_webhook_replicas import skewed_replica
skewed_replica(sys.argv[2:])
"""


async def test_replicas_with_skewed_clocks_agree_on_leases_and_retries(
    postgres_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    """One replica's attempt is in flight (its lease: 100 s) when another, whose clock is
    150 s ahead, starts and applies a change of its own: the second leaves the first's
    delivery alone, and its own delivery's times (when it was enqueued, when its failed
    attempt is retried) are on the database's clock."""
    db = await migrated(postgres_url, ["m1", "m2"])
    file = endpoints_file(tmp_path / "hooks.toml", {"e": receiver.url})
    receiver.answers["msg_m2_2"] = 500
    first = Replica(postgres_url, file, concurrency=1)
    second: asyncio.subprocess.Process | None = None
    log = tmp_path / "second.log"
    try:
        await first.changed(["m1"], first_revision=1)
        first.dispatcher.start()

        async def in_flight() -> bool:
            return receiver.holding == 1

        await wait_until(in_flight)
        before = await db.read(database_now)
        second = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _SKEWED_PROCESS,
            str(SKEW),
            postgres_url,
            str(file),
            "m2",
            stdin=subprocess.PIPE,
            stderr=log.open("wb"),
            cwd=Path(__file__).parent.parent,
        )

        async def its_attempt_failed() -> bool:
            assert second is not None
            if second.returncode is not None:
                raise AssertionError(f"the second replica ended: {log.read_text()}")
            return any(row.attempts == 1 for row in await stored(db))

        # Its first claim found both deliveries (it enqueued its own before it started).
        await wait_until(its_attempt_failed)
        after = await db.read(database_now)
        assert receiver.received == Counter({"msg_m1_1": 1, "msg_m2_2": 1})
        [_, its_own] = sorted(await stored(db), key=lambda row: row.id)
        assert before <= its_own.created_at <= after
        assert before + 30.0 <= its_own.next_attempt_at <= after + 60.0
    finally:
        if second is not None and second.stdin is not None:
            second.stdin.close()
            await second.wait()
        receiver.release_all()
        await first.close()
        await db.close()
