"""Several replicas of each service on one PostgreSQL, as processes, one of each SIGKILLed.

Three ``mediatag serve analysis`` and two ``mediatag serve ingest`` share one PostgreSQL (a
database per service) and one blob directory. The analysers are ``google`` ones calling the
fake Google APIs in a process of their own (``tests/google_api_process.py``), so every call
is counted where it arrives, a killed replica's included. Uploads go through both ingest
replicas (an upload cut off by a kill is sent again, with its request id, to the other one);
a watcher on each analysis replica reads every change. Mid-run one ingest and one analysis
replica are SIGKILLed and restarted; the watcher of the killed one resumes from the last
revision it read.

The moments of the kills are random: the test prints its seed, and
``MEDIATAG_TEST_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.analysis.v1 import analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from tests.conftest import PATIENCE, free_port, skip_without_google_extra, wait_until

skip_without_google_extra()  # the fake Google APIs speak Google's own messages

from tests.google_api_process import DIMENSIONS
from tests.google_fakes import ANNOTATE, PREDICT
from tests.media_samples import jpeg_bytes
from tests.postgres import PostgresServer
from tests.processes import Serve, stop_all, wait_serving

pytestmark = pytest.mark.e2e

ANALYSIS_REPLICAS = 3
INGEST_REPLICAS = 2
UPLOADS = 30
FILES_PER_UPLOAD = 2
UPLOADERS = 2
# The limit every replica is given, for each of the analyser's two APIs; the cluster as a
# whole must keep to it: at most RATE x WINDOW + BURST calls in any WINDOW seconds.
RATE, BURST, WINDOW = 5, 1, 10.0
# Short leases: the killed replica's jobs go back to pending soon.
LEASE_SECONDS = "2"
TERMINAL = (apb.PROCESSING_STATUS_COMPLETED, apb.PROCESSING_STATUS_FAILED)
INGEST_TERMINAL = (ipb.PROCESSING_STATUS_COMPLETED, ipb.PROCESSING_STATUS_FAILED)
# The repository root, for ``python -m tests.google_api_process``.
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Change:
    """One status change as a watcher read it."""

    revision: int
    media_id: str
    status: int
    attempt: int


@dataclass
class Watcher:
    """A WatchStatus stream on one analysis replica, from the moment it subscribed; when the
    stream breaks (its replica killed), it resumes there from the last revision it read."""

    port: int
    changes: list[Change] = field(default_factory=list)
    resumes: int = 0
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    _last: int | None = None

    async def run(self) -> None:
        while True:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
                try:
                    await self._read(stub)
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    self.resumes += 1
            # Until the replica serves again (the test's wait on the outcome bounds this).
            await asyncio.sleep(0.1)

    async def _read(self, stub: analysis_pb2_grpc.AnalysisServiceAsyncStub) -> None:
        if self._last is None:
            request = apb.WatchStatusRequest(send_initial_state=True)
        else:
            # 0 would mean "from now": a resume needs the revision of a change already read.
            assert self._last > 0, "the stream broke before its first change"
            request = apb.WatchStatusRequest(start_revision=self._last)
        async for response in stub.WatchStatus(request):
            if response.HasField("bookmark"):
                if response.bookmark.initial_state_end:
                    self._last = response.revision
                    self.subscribed.set()
                continue
            change = response.change
            if change.initial_state:
                continue
            self.changes.append(
                Change(response.revision, change.media_id, change.status, change.attempt)
            )
            self._last = response.revision
        raise AssertionError(f"the WatchStatus stream on port {self.port} ended")

    def up_to(self, revision: int) -> list[Change]:
        return [change for change in self.changes if change.revision <= revision]


@dataclass
class Uploads:
    """Media ids of every answered upload, and how often an upload had to go elsewhere."""

    media: dict[str, str] = field(default_factory=dict)  # media id -> sha256
    answered: int = 0
    sent_again: int = 0


@contextlib.contextmanager
def fake_google(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """The fake Google APIs in their own process: its Vision and Vertex ports, and the file
    its calls are in once the block ends."""
    vision_port, vertex_port = free_port(), free_port()
    calls = tmp_path / "google-calls.jsonl"
    with (tmp_path / "google.log").open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "tests.google_api_process", "--vision-port",
                str(vision_port), "--vertex-port", str(vertex_port), "--calls", str(calls),
            ],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        for port in (vision_port, vertex_port):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=PATIENCE)
        yield vision_port, vertex_port, calls
    finally:
        process.terminate()
        process.wait(timeout=PATIENCE)


@contextlib.asynccontextmanager
async def replicas(servers: Sequence[tuple[Serve, int]]) -> AsyncIterator[None]:
    """Start every server at once (their migrations race), wait until each serves; stop all."""
    for server, _ in servers:
        server.start()
    try:
        for _, port in servers:
            await asyncio.to_thread(wait_serving, port)
        yield
    finally:
        stop_all(*(server for server, _ in servers))


@dataclass(frozen=True)
class Topology:
    """Who listens where, and who talks to whom."""

    analysis_url: str
    ingest_url: str
    analysis_ports: list[int] = field(
        default_factory=lambda: [free_port() for _ in range(ANALYSIS_REPLICAS)]
    )
    ingest_ports: list[int] = field(
        default_factory=lambda: [free_port() for _ in range(INGEST_REPLICAS)]
    )

    def analysis(self, tmp_path: Path, n: int, vision_port: int, vertex_port: int) -> Serve:
        """Analysis replica ``n``; it reads content from one ingest replica (a killed one
        holds its jobs up)."""
        return Serve(
            tmp_path / f"analysis{n}.log", "analysis",
            "--analysis-port", str(self.analysis_ports[n]),
            "--data-dir", str(tmp_path / f"analysis{n}"),
            "--analysis-database-url", self.analysis_url,
            "--ingest-address", f"127.0.0.1:{self.ingest_ports[n % INGEST_REPLICAS]}",
            "--analyzer", "google", "--gcp-project", "replicas",
            "--vision-endpoint", f"127.0.0.1:{vision_port}",
            "--vertex-endpoint", f"127.0.0.1:{vertex_port}", "--google-insecure",
            "--embedding-dimensions", str(DIMENSIONS),
            "--rate-limit", f"vision={RATE}:{BURST}",
            "--rate-limit", f"embeddings={RATE}:{BURST}",
            "--lease-seconds", LEASE_SECONDS, "--backoff-base", "0.1",
        )  # fmt: skip

    def ingest(self, tmp_path: Path, n: int) -> Serve:
        """Ingest replica ``n``; every replica reads every blob (one shared directory)."""
        return Serve(
            tmp_path / f"ingest{n}.log", "ingest",
            "--ingest-port", str(self.ingest_ports[n]),
            "--data-dir", str(tmp_path / f"ingest{n}"),
            "--ingest-database-url", self.ingest_url,
            "--blob-store", (tmp_path / "blobs").as_uri(),
            "--analysis-address", f"127.0.0.1:{self.analysis_ports[-1 - n]}",
        )  # fmt: skip


async def test_replicas_killed_mid_run_lose_nothing_and_keep_one_order_and_one_limit(
    tmp_path: Path,
    postgres: PostgresServer,
    seed: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(seed)
    # With --google-insecure no credentials are looked up; this makes sure none ever could be.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    topology = Topology(postgres.create_database(), postgres.create_database())
    try:
        with fake_google(tmp_path) as (vision_port, vertex_port, calls_file):
            analysis = [
                topology.analysis(tmp_path, n, vision_port, vertex_port)
                for n in range(ANALYSIS_REPLICAS)
            ]
            ingest = [topology.ingest(tmp_path, n) for n in range(INGEST_REPLICAS)]
            async with replicas(
                [*zip(analysis, topology.analysis_ports), *zip(ingest, topology.ingest_ports)]  # noqa: B905
            ):
                watchers, uploads = await _run(rng, topology, analysis, ingest)
        # The fake wrote its calls when it stopped.
        calls = [json.loads(line) for line in calls_file.read_text().splitlines()]
    finally:
        postgres.drop_database(topology.analysis_url)
        postgres.drop_database(topology.ingest_url)
    _check_one_history(watchers, uploads)
    _check_one_limit(calls)
    _check_calls_within_attempts(calls, watchers[0].changes, uploads)


async def _run(
    rng: random.Random, topology: Topology, analysis: list[Serve], ingest: list[Serve]
) -> tuple[list[Watcher], Uploads]:
    """Uploads, watchers and the two kills; returns once everything answered is terminal,
    at ingest and in every watcher, and every watcher has read up to the last revision."""
    analysis_ports, ingest_ports = topology.analysis_ports, topology.ingest_ports
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
            for port in [*ingest_ports, *analysis_ports]
        ]
        ingest_stubs = [ingest_pb2_grpc.IngestServiceStub(c) for c in channels[:INGEST_REPLICAS]]
        analysis_stubs = [
            analysis_pb2_grpc.AnalysisServiceStub(c) for c in channels[INGEST_REPLICAS:]
        ]
        watchers = [Watcher(port) for port in analysis_ports]
        tasks = [asyncio.create_task(watcher.run()) for watcher in watchers]
        try:
            for watcher in watchers:
                await asyncio.wait_for(watcher.subscribed.wait(), PATIENCE)
            uploads = Uploads()
            killed_ingest, killed_analysis = (
                rng.randrange(INGEST_REPLICAS),
                rng.randrange(ANALYSIS_REPLICAS),
            )
            ingest_kill_at = rng.randrange(UPLOADS // 4, UPLOADS // 2)
            analysis_kill_at = rng.randrange(UPLOADS * FILES_PER_UPLOAD // 4, UPLOADS)
            print(
                f"SIGKILL ingest {killed_ingest} after {ingest_kill_at} uploads answered, "
                f"analysis {killed_analysis} after {analysis_kill_at} completions"
            )
            requests = iter(enumerate(_upload_requests(rng)))
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(UPLOADERS):
                        group.create_task(_upload_all(requests, ingest_stubs, uploads))
                    group.create_task(
                        _kill_and_restart(
                            ingest[killed_ingest],
                            ingest_ports[killed_ingest],
                            lambda: uploads.answered >= ingest_kill_at,
                        )
                    )
                    group.create_task(
                        _kill_and_restart(
                            analysis[killed_analysis],
                            analysis_ports[killed_analysis],
                            lambda: _completed(watchers[0]) >= analysis_kill_at,
                        )
                    )
            except* AssertionError as failed:
                failed.add_note(_progress(watchers, uploads))
                raise
            assert uploads.answered == UPLOADS

            async def stream_broke() -> bool:
                # Its task may not have run since the kill yet (seen beside two busy loops).
                return watchers[killed_analysis].resumes > 0

            await wait_until(stream_broke)

            async def all_terminal() -> bool:
                for watcher in watchers:
                    ended = {c.media_id for c in watcher.changes if c.status in TERMINAL}
                    if not ended >= set(uploads.media):
                        return False
                for stub in ingest_stubs:
                    for media_id in uploads.media:
                        got = await stub.GetMedia(ipb.GetMediaRequest(media_id=media_id))
                        if got.media.status not in INGEST_TERMINAL:
                            return False
                return True

            try:
                await wait_until(all_terminal, interval=0.2)
            except AssertionError as error:
                error.add_note(_progress(watchers, uploads))
                raise
            statuses = [await s.GetQueueStatus(apb.GetQueueStatusRequest()) for s in analysis_stubs]
            last = max(status.current_revision for status in statuses)

            async def all_read_up_to_last() -> bool:
                return all(w.changes and w.changes[-1].revision >= last for w in watchers)

            await wait_until(all_read_up_to_last)
            for task in tasks:
                if task.done():
                    task.result()
            return watchers, uploads
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _progress(watchers: list[Watcher], uploads: Uploads) -> str:
    """How far each watcher got, for a run that did not finish."""
    lines = [f"{len(uploads.media)} media answered ({uploads.sent_again} uploads sent again)"]
    for watcher in watchers:
        ended = {c.media_id for c in watcher.changes if c.status in TERMINAL}
        lines.append(
            f"watcher on port {watcher.port}: {len(watcher.changes)} changes, "
            f"{len(ended & set(uploads.media))} media terminal, {watcher.resumes} resumes"
        )
    return "\n".join(lines)


def _completed(watcher: Watcher) -> int:
    return sum(1 for change in watcher.changes if change.status == apb.PROCESSING_STATUS_COMPLETED)


def _upload_requests(rng: random.Random) -> list[ipb.UploadMediaRequest]:
    return [
        ipb.UploadMediaRequest(
            owner_id="replicas",
            category="Hair",
            request_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            files=[
                ipb.MediaFile(
                    filename=f"{number}-{n}.jpg",
                    content=jpeg_bytes(seed=number * FILES_PER_UPLOAD + n, size=(64, 48)),
                )
                for n in range(FILES_PER_UPLOAD)
            ],
        )
        for number in range(UPLOADS)
    ]


async def _upload_all(
    requests: Iterator[tuple[int, ipb.UploadMediaRequest]],
    stubs: list[ingest_pb2_grpc.IngestServiceAsyncStub],
    uploads: Uploads,
) -> None:
    """Upload until ``requests`` runs out, alternating replicas; an upload cut off by a kill
    goes, with the same request id, to the other replica (ingest answers it once)."""
    for number, request in requests:
        replica = number % INGEST_REPLICAS

        async def answered(request: ipb.UploadMediaRequest = request) -> bool:
            nonlocal replica
            try:
                response = await stubs[replica].UploadMedia(request, timeout=PATIENCE)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                uploads.sent_again += 1
                replica = (replica + 1) % INGEST_REPLICAS
                return False
            for media in response.media:
                uploads.media[media.id] = media.sha256
            uploads.answered += 1
            return True

        await wait_until(answered)


async def _kill_and_restart(server: Serve, port: int, when: Callable[[], bool]) -> None:
    """SIGKILL ``server`` once ``when()`` holds, then start it again."""

    async def due() -> bool:
        return bool(when())

    await wait_until(due, interval=0.01)
    server.kill()
    server.start()
    await asyncio.to_thread(wait_serving, port)


def _check_one_history(watchers: list[Watcher], uploads: Uploads) -> None:
    """Every watcher read the same changes, one revision after the other; every answered
    upload has exactly one terminal change, made by the attempt that claimed it last."""
    last = min(watcher.changes[-1].revision for watcher in watchers)
    history = watchers[0].up_to(last)
    for watcher in watchers[1:]:
        assert watcher.up_to(last) == history, f"watcher on port {watcher.port} differs"
    revisions = [change.revision for change in history]
    assert revisions == list(range(revisions[0], revisions[0] + len(revisions))), "a gap"
    by_media: dict[str, list[Change]] = defaultdict(list)
    for change in history:
        by_media[change.media_id].append(change)
    for media_id in uploads.media:
        changes = by_media[media_id]
        terminal = [change for change in changes if change.status in TERMINAL]
        assert len(terminal) == 1, changes
        claims = [c.attempt for c in changes if c.status == apb.PROCESSING_STATUS_PROCESSING]
        assert claims, changes
        # A completion by an attempt other than the latest claim is a second attempt's.
        assert terminal[0].attempt == max(claims), changes


def _check_one_limit(calls: list[dict[str, object]]) -> None:
    """No WINDOW seconds held more than RATE x WINDOW + BURST calls of either API."""
    for method in (ANNOTATE, PREDICT):
        times = sorted(float(str(call["at"])) for call in calls if call["method"] == method)
        assert times, f"no {method} calls"
        most = max(
            sum(1 for later in times[first:] if later < times[first] + WINDOW)
            for first in range(len(times))
        )
        assert most <= RATE * WINDOW + BURST, f"{most} {method} calls within {WINDOW} s"


def _check_calls_within_attempts(
    calls: list[dict[str, object]], history: list[Change], uploads: Uploads
) -> None:
    """Each image reached Vision at most once per attempt (claim) its job had: two workers
    holding one claim would call twice."""
    sent = Counter(
        digest
        for call in calls
        if call["method"] == ANNOTATE
        for digest in cast(list[str], call["sha256"])
    )
    attempts = Counter(
        change.media_id for change in history if change.status == apb.PROCESSING_STATUS_PROCESSING
    )
    for media_id, sha256 in uploads.media.items():
        assert 1 <= sent[sha256] <= attempts[media_id], (media_id, sent[sha256], attempts[media_id])
