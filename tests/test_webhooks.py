"""Webhooks end to end: both services in-process, a local HTTP receiver, the Standard Webhooks
library verifying what arrives."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from mediatag.ingest.v1 import ingest_pb2 as ipb
from sqlalchemy.engine import Connection
from standardwebhooks.webhooks import Webhook

from analysis_service.config import AnalysisConfig, RateLimitConfig
from analysis_service.errors import PermanentAnalyzerError
from ingest_service.config import IngestConfig, WebhookConfig
from ingest_service.domain.webhook_endpoints import WebhookEndpoints
from ingest_service.domain.webhooks import DispatchLimits, RetryPolicy, WebhookDispatcher
from ingest_service.metrics import IngestMetrics
from ingest_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from ingest_service.storage.sql_deliveries import SqlDeliveryStore
from ingest_service.webhook_http import HttpWebhookSender
from mediatag_common.database import Database, sqlite_url
from tests.conftest import PATIENCE, Cluster, free_port, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.media_samples import jpeg_bytes

OWNER = "listing-1"


def secret_of(name: str) -> str:
    return "whsec_" + base64.b64encode(hashlib.sha256(name.encode()).digest()).decode()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def data(self) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads(self.body)
        return payload


@dataclass
class Receiver:
    """A webhook receiver: each path answers the statuses of ``script`` in turn (then 200);
    a path in ``stuck`` never answers."""

    port: int = field(default_factory=free_port)
    script: dict[str, list[int]] = field(default_factory=dict)
    stuck: set[str] = field(default_factory=set)
    received: dict[str, list[Received]] = field(default_factory=lambda: defaultdict(list))
    hanging: int = 0
    _runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        self.received[path].append(Received(dict(request.headers), await request.read()))
        if path in self.stuck:
            self.hanging += 1
            await asyncio.Event().wait()
        script = self.script.get(path) or [200]
        return web.Response(status=script.pop(0) if len(script) > 1 else script[0])

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    started = Receiver()
    yield started
    await started.stop()


def endpoints_file(path: Path, endpoints: dict[str, str], extra: str = "") -> Path:
    """A webhooks file naming each endpoint (name -> url), secret derived from the name."""
    text = "".join(
        f'[[endpoints]]\nname = "{name}"\nurl = "{url}"\nsecret = "{secret_of(name)}"\n{extra}\n'
        for name, url in endpoints.items()
    )
    path.write_text(text)
    return path


def webhook_cluster(
    make_cluster: Callable[..., Cluster],
    file: Path,
    analyzer: ScriptedAnalyzer | None = None,
    **settings: Any,
) -> Cluster:
    """Both services, the ingest service sending webhooks to the endpoints of ``file`` and
    retrying within a fraction of a second."""
    hooks = WebhookConfig(
        file=file, initial_backoff=0.05, max_backoff=0.2, poll_interval=0.1, **settings
    )
    return make_cluster(
        analyzer=analyzer or ScriptedAnalyzer(),
        analysis_config=AnalysisConfig(rate_limits={"local": RateLimitConfig(100, 1)}),
        ingest_config=IngestConfig(webhooks=hooks),
    )


async def upload(cluster: Cluster, seeds: range) -> list[str]:
    files = [ipb.MediaFile(filename=f"p{n}.jpg", content=jpeg_bytes(seed=n)) for n in seeds]
    response = await cluster.ingest.UploadMedia(
        ipb.UploadMediaRequest(owner_id=OWNER, category="Hair", files=files), timeout=PATIENCE
    )
    return [m.id for m in response.media]


def stored_deliveries(cluster: Cluster) -> int:
    with sqlite3.connect(cluster.root / "ingest" / "ingest.db") as conn:
        (count,) = conn.execute("SELECT count(*) FROM webhook_deliveries").fetchone()
    return int(count)


def verified(name: str, received: Received) -> dict[str, Any]:
    """The payload, once its signature checked out with the endpoint's secret."""
    payload: dict[str, Any] = Webhook(secret_of(name)).verify(received.body, received.headers)
    return payload


async def test_a_failing_receiver_gets_the_same_signed_change_until_it_accepts(
    make_cluster: Callable[..., Cluster], receiver: Receiver, tmp_path: Path
) -> None:
    receiver.script["flaky"] = [500, 500, 200]
    await receiver.start()
    cluster = webhook_cluster(
        make_cluster, endpoints_file(tmp_path / "hooks.toml", {"flaky": receiver.url("flaky")})
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    [media_id] = await upload(cluster, range(1))

    async def accepted() -> bool:
        return len(receiver.received["flaky"]) >= 3 and stored_deliveries(cluster) == 0

    await wait_until(accepted)
    attempts = receiver.received["flaky"]
    assert len(attempts) == 3
    assert len({a.headers["webhook-id"] for a in attempts}) == 1
    payloads = [verified("flaky", a) for a in attempts]
    assert all(p == {**payloads[0], "timestamp": p["timestamp"]} for p in payloads)
    data = payloads[0]["data"]
    assert payloads[0]["type"] == "media.completed"
    assert (data["mediaId"], data["ownerId"], data["status"]) == (media_id, OWNER, "COMPLETED")
    got = await cluster.ingest.GetMedia(ipb.GetMediaRequest(media_id=media_id), timeout=PATIENCE)
    assert data["revision"] == got.media.status_revision
    assert attempts[0].headers["webhook-id"] == f"msg_{media_id}_{data['revision']}"
    with pytest.raises(Exception, match="signature"):
        Webhook(secret_of("another")).verify(attempts[0].body, attempts[0].headers)


async def test_a_receiver_down_across_an_ingest_restart_gets_every_change(
    make_cluster: Callable[..., Cluster], receiver: Receiver, tmp_path: Path
) -> None:
    """Failures (FAILED) and completions both arrive; an endpoint asking for failures only
    gets those."""
    broken = hashlib.sha256(jpeg_bytes(seed=0)).hexdigest()
    analyzer = ScriptedAnalyzer(
        fail_always={broken: PermanentAnalyzerError("cannot decode", reason="IMAGE_UNDECODABLE")}
    )
    file = endpoints_file(tmp_path / "hooks.toml", {"all": receiver.url("all")})
    with file.open("a") as text:
        text.write(
            f'[[endpoints]]\nname = "failures"\nurl = "{receiver.url("failures")}"\n'
            f'secret = "{secret_of("failures")}"\nstatuses = ["FAILED"]\n'
        )
    cluster = webhook_cluster(make_cluster, file, analyzer=analyzer)
    await cluster.start_analysis()
    await cluster.start_ingest()
    media_ids = await upload(cluster, range(3))

    async def all_terminal() -> bool:
        response = await cluster.ingest.ListMedia(
            ipb.ListMediaRequest(owner_id=OWNER), timeout=PATIENCE
        )
        terminal = {ipb.PROCESSING_STATUS_COMPLETED, ipb.PROCESSING_STATUS_FAILED}
        return len(response.media) == 3 and all(m.status in terminal for m in response.media)

    await wait_until(all_terminal)
    await cluster.stop_ingest()
    await receiver.start()
    await cluster.start_ingest()

    async def delivered() -> bool:
        return stored_deliveries(cluster) == 0 and len(receiver.received["all"]) >= 3

    await wait_until(delivered)
    changes = {verified("all", r)["data"]["mediaId"]: r for r in receiver.received["all"]}
    assert set(changes) == set(media_ids)
    statuses = {verified("all", r)["data"]["status"] for r in changes.values()}
    assert statuses == {"COMPLETED", "FAILED"}
    [failure] = {verified("failures", r)["data"]["mediaId"] for r in receiver.received["failures"]}
    assert failure == media_ids[0]


async def test_an_attempt_cut_short_by_an_ingest_restart_is_sent_again_at_once(
    make_cluster: Callable[..., Cluster], receiver: Receiver, tmp_path: Path
) -> None:
    """The stopping service gives back the delivery it was sending: the next one sends it
    at once, not after the claim's lease (here half an hour, the attempt timeout being long)."""
    receiver.stuck.add("slow")
    await receiver.start()
    file = endpoints_file(tmp_path / "hooks.toml", {"slow": receiver.url("slow")})
    cluster = webhook_cluster(make_cluster, file, timeout=600.0)
    await cluster.start_analysis()
    await cluster.start_ingest()
    [media_id] = await upload(cluster, range(1))

    async def in_flight() -> bool:
        return receiver.hanging == 1

    await wait_until(in_flight)
    await cluster.stop_ingest()
    receiver.stuck.discard("slow")
    await cluster.start_ingest()

    async def delivered() -> bool:
        return stored_deliveries(cluster) == 0

    await wait_until(delivered)
    first, again = receiver.received["slow"]
    assert first.headers["webhook-id"] == again.headers["webhook-id"]
    assert verified("slow", again)["data"]["mediaId"] == media_id


async def test_a_dispatcher_stopped_as_it_is_woken_stops(tmp_path: Path) -> None:
    """A wake-up (an attempt ending, a delivery enqueued) in the same instant as the stop:
    the stop must not be lost, or stop() waits for a loop that runs on, forever.

    Each dispatcher is woken once its first claim (there is nothing to claim) is over, then
    stopped 0 to 7 turns of the event loop later: the cancellation lands on each step of
    the wake-up in turn."""
    db = Database(sqlite_url(str(tmp_path / "ingest.db")), synchronous="NORMAL")
    await db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    loop = asyncio.get_running_loop()
    committed = asyncio.Event()

    def on_commit(conn: Connection) -> None:
        # On the database thread.
        loop.call_soon_threadsafe(committed.set)

    # Nothing listens there; nothing is enqueued anyway: the loop claims nothing, then waits.
    file = endpoints_file(tmp_path / "hooks.toml", {"e": f"http://127.0.0.1:{free_port()}/e"})
    endpoints = WebhookEndpoints(file, max_endpoints=4, reload_interval=5.0)
    endpoints.load()
    sender = HttpWebhookSender(timeout=10.0, max_connections=4)
    sa.event.listen(db.engine, "commit", on_commit)
    try:
        for turns in range(8):
            dispatcher = WebhookDispatcher(
                store=SqlDeliveryStore(db),
                sender=sender,
                endpoints=endpoints,
                policy=RetryPolicy(0.05, 0.2, 3600.0),
                # Polls far apart: between claims the loop waits on its wake-up event.
                limits=DispatchLimits(concurrency=2, timeout=10.0, poll_interval=600.0),
                observer=IngestMetrics(),
            )
            committed.clear()
            dispatcher.start()
            await asyncio.wait_for(committed.wait(), PATIENCE)
            # SQLite's one writer thread takes transactions in turn: once this one is done,
            # the claim's result has reached the loop, which went back to wait.
            await db.write(lambda conn: None)
            dispatcher.wake(["e"])
            for _ in range(turns):
                await asyncio.sleep(0)
            stopping = asyncio.create_task(dispatcher.stop())
            done, _ = await asyncio.wait({stopping}, timeout=PATIENCE)
            assert done, f"stop() {turns} turns after the wake-up never ended"
    finally:
        sa.event.remove(db.engine, "commit", on_commit)
        await sender.close()
        await db.close()


async def test_an_endpoint_that_never_answers_does_not_delay_another(
    make_cluster: Callable[..., Cluster], receiver: Receiver, tmp_path: Path
) -> None:
    receiver.stuck.add("stuck")
    await receiver.start()
    file = endpoints_file(
        tmp_path / "hooks.toml", {"stuck": receiver.url("stuck"), "quick": receiver.url("quick")}
    )
    # The stuck endpoint's attempts hold their slots for the whole (long) timeout.
    cluster = webhook_cluster(make_cluster, file, concurrency=2, timeout=600.0)
    await cluster.start_analysis()
    await cluster.start_ingest()
    media_ids = await upload(cluster, range(4))

    async def quick_has_all() -> bool:
        return {verified("quick", r)["data"]["mediaId"] for r in receiver.received["quick"]} == (
            set(media_ids)
        )

    await wait_until(quick_has_all)
    # Still hanging: the stuck endpoint holds both its slots and got nothing more.
    assert receiver.hanging == 2
    assert len(receiver.received["stuck"]) == 2
