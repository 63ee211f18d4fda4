"""Chaos: both services as separate processes, SIGKILLed at random moments under upload load.

Every upload answered with success must survive with its bytes intact and reach exactly one
terminal status; an upload that was not answered may or may not have been stored, but never
half: whatever item exists is whole.

The moments are random: the test prints its seed, and ``MEDIATAG_TEST_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.analysis.v1 import analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from tests.conftest import PATIENCE, free_port, wait_until
from tests.media_samples import jpeg_bytes
from tests.processes import Serve, stop_all

pytestmark = pytest.mark.e2e

CLIENTS = 3
KILL_ROUNDS = 3
OWNER = "chaos"
TERMINAL = (ipb.PROCESSING_STATUS_COMPLETED, ipb.PROCESSING_STATUS_FAILED)


@dataclass
class Ledger:
    """What the clients sent, and what the service confirmed."""

    answered: dict[str, str] = field(default_factory=dict)  # media id -> sha256
    attempted: set[str] = field(default_factory=set)  # sha256 of every file ever sent
    refused: int = 0


async def _upload_until(
    stop: asyncio.Event, port: int, client: int, ledger: Ledger, rng: random.Random
) -> None:
    """Upload batches of one to three unique images until ``stop``; note every answer."""
    sequence = 0
    while not stop.is_set():
        files = []
        for _ in range(rng.randint(1, 3)):
            content = jpeg_bytes(seed=client * 1_000_000 + sequence, size=(96, 64))
            sequence += 1
            ledger.attempted.add(hashlib.sha256(content).hexdigest())
            files.append(ipb.MediaFile(filename=f"{sequence}.jpg", content=content))
        # A fresh channel per call: a killed server must not leave the client on a dead
        # connection longer than its reconnect backoff.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            try:
                response = await stub.UploadMedia(
                    ipb.UploadMediaRequest(owner_id=OWNER, files=files), timeout=5
                )
            except grpc.aio.AioRpcError as exc:
                # A killed or restarting service is the only refusal this load may meet.
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
                ledger.refused += 1
                await asyncio.sleep(0.05)
                continue
        for media, sent in zip(response.media, files, strict=True):
            assert media.sha256 == hashlib.sha256(sent.content).hexdigest()
            ledger.answered[media.id] = media.sha256
        # Steady load, not a flood: the queue must drain within the test's patience.
        await asyncio.sleep(0.1)


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


async def _read_all(stub: ingest_pb2_grpc.IngestServiceAsyncStub) -> list[ipb.Media]:
    items: list[ipb.Media] = []
    token = ""
    while True:
        page = await stub.ListMedia(
            ipb.ListMediaRequest(owner_id=OWNER, page_size=500, page_token=token)
        )
        items.extend(page.media)
        token = page.next_page_token
        if not token:
            return items


async def _content_sha256(stub: ingest_pb2_grpc.IngestServiceAsyncStub, media_id: str) -> str:
    digest = hashlib.sha256()
    async for chunk in stub.ReadMediaContent(ipb.ReadMediaContentRequest(media_id=media_id)):
        digest.update(chunk.data)
    return digest.hexdigest()


async def _terminal_events(
    stub: analysis_pb2_grpc.AnalysisServiceAsyncStub, through: int
) -> dict[str, list[int]]:
    """Terminal statuses per media id in the whole event log (revision 1 is a submission)."""
    terminal: dict[str, list[int]] = {}
    call = stub.WatchStatus(apb.WatchStatusRequest(start_revision=1))
    try:
        async for response in call:
            if response.HasField("change") and response.change.status in (
                apb.PROCESSING_STATUS_COMPLETED,
                apb.PROCESSING_STATUS_FAILED,
            ):
                terminal.setdefault(response.change.media_id, []).append(response.change.status)
            if response.revision >= through:
                return terminal
    finally:
        call.cancel()
    raise AssertionError("the watch ended before the current revision")


async def test_sigkill_of_either_service_under_load_loses_no_answered_upload(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    ingest_port, analysis_port = free_port(), free_port()
    common = (
        "--data-dir",
        str(tmp_path / "data"),
        "--ingest-port",
        str(ingest_port),
        "--analysis-port",
        str(analysis_port),
    )
    ingest_args = ("ingest", *common)

    def analysis_args(processes: int) -> tuple[str, ...]:
        return (
            "analysis",
            *common,
            "--lease-seconds",
            "2",
            "--rate-limit",
            "local=200:20",
            "--analyzer-processes",
            str(processes),
        )

    # The services that are killed analyse in a process (at idle CPU priority) that must leave
    # by itself. The last one analyses in threads of its own process: on a loaded machine an
    # idle-priority process gets only what the load leaves, and the drain would wait on the
    # machine rather than on the code under test.
    ingest = Serve(tmp_path / "ingest.log", *ingest_args).start(ingest_port)
    analysis = Serve(tmp_path / "analysis.log", *analysis_args(1)).start(analysis_port)
    ledger = Ledger()
    stop = asyncio.Event()
    orphans: set[int] = set()  # analysis processes of killed services
    clients = [
        asyncio.create_task(_upload_until(stop, ingest_port, n, ledger, random.Random(seed + n)))
        for n in range(CLIENTS)
    ]
    try:
        for kill_round in range(KILL_ROUNDS):
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            assert analysis.process is not None
            orphans |= _children(analysis.process.pid)
            analysis.kill()
            await asyncio.sleep(rng.uniform(0.1, 0.8))
            last = kill_round == KILL_ROUNDS - 1
            analysis = Serve(tmp_path / "analysis.log", *analysis_args(0 if last else 1))
            await asyncio.to_thread(analysis.start, analysis_port)
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            ingest.kill()
            await asyncio.sleep(rng.uniform(0.1, 0.8))
            ingest = Serve(tmp_path / "ingest.log", *ingest_args)
            await asyncio.to_thread(ingest.start, ingest_port)
        # Load after the last restart too, then let the queue drain.
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), timeout=PATIENCE)
        assert ledger.answered, "no upload succeeded"
        assert ledger.refused, "no upload met a killed service: not chaos"

        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{ingest_port}") as ingest_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{analysis_port}") as analysis_channel,
        ):
            ingest_stub = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
            analysis_stub = analysis_pb2_grpc.AnalysisServiceStub(analysis_channel)

            async def all_terminal() -> bool:
                return all(m.status in TERMINAL for m in await _read_all(ingest_stub))

            await wait_until(all_terminal, interval=0.5)
            items = {m.id: m for m in await _read_all(ingest_stub)}

            # Every answered upload exists, whole, and completed.
            for media_id, sha256 in ledger.answered.items():
                assert media_id in items, f"answered upload {media_id} lost"
                assert items[media_id].sha256 == sha256
                assert await _content_sha256(ingest_stub, media_id) == sha256
                # Ingest being away is a wait, not a failure; only kills of the analysis
                # service mid-job use up attempts (as a job that crashes its worker would).
                media = items[media_id]
                assert media.status == ipb.PROCESSING_STATUS_COMPLETED or (
                    media.status == ipb.PROCESSING_STATUS_FAILED
                    and media.error.reason == "LEASE_EXPIRED"
                ), media
            # Whatever else is stored came from an unanswered attempt, and is whole too.
            for media_id, media in items.items():
                assert media.sha256 in ledger.attempted
                assert await _content_sha256(ingest_stub, media_id) == media.sha256
            # Temp files of blobs a kill cut short were removed when ingest started again.
            assert not list((tmp_path / "data" / "ingest" / "blobs").rglob(".incoming-*"))

            # Exactly one terminal status per item, over the whole event log.
            status = await analysis_stub.GetQueueStatus(apb.GetQueueStatusRequest())
            terminal = await asyncio.wait_for(
                _terminal_events(analysis_stub, status.current_revision), timeout=PATIENCE
            )
            assert set(terminal) == set(items)
            assert all(len(statuses) == 1 for statuses in terminal.values()), terminal

        # The analysis processes of a killed service leave by themselves.
        assert orphans, "the killed analysis services had no analysis processes"

        async def orphans_gone() -> bool:
            return not any(_alive(pid) for pid in orphans)

        await wait_until(orphans_gone)
    finally:
        stop.set()
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        stop_all(analysis, ingest)
