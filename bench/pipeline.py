"""Both mediatag services as processes, and the client side of a run through them.

Ingest is ``mediatag serve ingest`` as a user starts it; analysis is ``bench.sim_server``
(the real service with the simulated analyser). The client uploads byte-distinct images
(so the result cache never short-circuits a job), submits jobs, and times each COMPLETED
status as a ``WatchStatus`` stream delivers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
from mediatag.analysis.v1 import analysis_pb2, analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from bench.jpeg import photo_like_jpeg, with_comment
from bench.load import run_closed_loop
from bench.processes import PACKAGE_PARENT, running_server
from bench.sim_server import SimServer
from mediatag_common.errors import error_info
from mediatag_common.grpc_server import channel_options

FILES_PER_UPLOAD = 32
IMAGE_SIZE = (64, 48)
IMAGE_TARGET_BYTES = 2000
CALL_TIMEOUT = 60.0
_READY_TIMEOUT = 60.0
_STOP_TIMEOUT = 20.0
_ENV_PREFIX = "MEDIATAG_"
_COMPLETED = analysis_pb2.PROCESSING_STATUS_COMPLETED
_FAILED = analysis_pb2.PROCESSING_STATUS_FAILED


def _clean_env() -> dict[str, str]:
    """This environment without MEDIATAG_* variables: the services run on their defaults."""
    return {key: value for key, value in os.environ.items() if not key.startswith(_ENV_PREFIX)}


@contextlib.asynccontextmanager
async def running_ingest(
    work_dir: Path, *, port: int, analysis_address: str, synchronous: str = "FULL"
) -> AsyncIterator[tuple[ingest_pb2_grpc.IngestServiceAsyncStub, asyncio.subprocess.Process]]:
    """``mediatag serve ingest`` (data under ``work_dir``): a stub for it, and its process."""
    mediatag = Path(sys.executable).parent / "mediatag"
    argv = [
        str(mediatag), "serve", "ingest", "--data-dir", str(work_dir),
        "--ingest-port", str(port), "--analysis-address", analysis_address,
        "--sqlite-synchronous", synchronous, "--ingest-metrics-port", "0",
        "--log-level", "WARNING",
    ]  # fmt: skip
    address = f"127.0.0.1:{port}"
    server = running_server(
        "mediatag ingest", argv, address=address, log_path=work_dir / "ingest.log",
        ready_timeout=_READY_TIMEOUT, stop_timeout=_STOP_TIMEOUT, env=_clean_env(),
    )  # fmt: skip
    async with (
        server as process,
        grpc.aio.insecure_channel(address, options=channel_options()) as channel,
    ):
        yield ingest_pb2_grpc.IngestServiceStub(channel), process


@contextlib.asynccontextmanager
async def running_analysis(
    sim: SimServer, log_path: Path
) -> AsyncIterator[tuple[analysis_pb2_grpc.AnalysisServiceAsyncStub, asyncio.subprocess.Process]]:
    """``python -m bench.sim_server`` as ``sim`` says: a stub for it, and its process."""
    address = f"127.0.0.1:{sim.port}"
    server = running_server(
        "mediatag analysis (simulated analyser)", [sys.executable, *sim.argv()],
        address=address, log_path=log_path, ready_timeout=_READY_TIMEOUT,
        stop_timeout=_STOP_TIMEOUT, cwd=PACKAGE_PARENT, env=_clean_env(),
    )  # fmt: skip
    async with (
        server as process,
        grpc.aio.insecure_channel(address, options=channel_options()) as channel,
    ):
        yield analysis_pb2_grpc.AnalysisServiceStub(channel), process


def distinct_images(count: int, *, label: str) -> list[bytes]:
    """``count`` small JPEGs of one picture, each with distinct bytes (a COM segment)."""
    width, height = IMAGE_SIZE
    base = photo_like_jpeg(0, target_bytes=IMAGE_TARGET_BYTES, width=width, height=height)
    return [with_comment(base.content, f"bench {label} {n}".encode()) for n in range(count)]


async def upload_all(
    ingest: ingest_pb2_grpc.IngestServiceAsyncStub,
    images: Sequence[bytes],
    *,
    concurrency: int = 1,
) -> list[ingest_pb2.Media]:
    """Upload ``images`` in UploadMedia calls of up to 32 files; the media in image order."""
    batches = [
        images[first : first + FILES_PER_UPLOAD]
        for first in range(0, len(images), FILES_PER_UPLOAD)
    ]
    pending = iter(enumerate(batches))
    stored: dict[int, Sequence[ingest_pb2.Media]] = {}

    async def upload_next() -> float:
        index, batch = next(pending)
        request = ingest_pb2.UploadMediaRequest(
            owner_id="bench-owner",
            category="Hair",
            files=[
                ingest_pb2.MediaFile(filename=f"image-{index}-{n}.jpg", content=content)
                for n, content in enumerate(batch)
            ],
        )
        started = time.perf_counter()
        response = await ingest.UploadMedia(request, timeout=CALL_TIMEOUT)
        stored[index] = response.media
        return time.perf_counter() - started

    await run_closed_loop(upload_next, calls=len(batches), concurrency=concurrency)
    return [media for index in sorted(stored) for media in stored[index]]


def job_spec(media: ingest_pb2.Media) -> analysis_pb2.JobSpec:
    """The job ingest's outbox would submit for ``media``: a reference to its bytes."""
    return analysis_pb2.JobSpec(
        media_id=media.id,
        owner_id=media.owner_id,
        category=media.category,
        sha256=media.sha256,
        size_bytes=media.size_bytes,
        content_type=media.content_type,
        content_ref=media.id,
    )


class Completions:
    """One WatchStatus stream over every item, from when it opens: when each job completed.

    ``times`` holds ``time.perf_counter()`` at the receipt of each job's COMPLETED status.
    A FAILED status, or the stream ending first, fails the run; a stream cut off as too slow
    is resumed from its last revision (``resumed`` counts those).
    """

    def __init__(self, analysis: analysis_pb2_grpc.AnalysisServiceAsyncStub, expected: int) -> None:
        self._analysis = analysis
        self.expected = expected
        self.times: list[float] = []
        self._completed: set[str] = set()
        self._opened = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The revision read last, where a stream cut off as too slow resumes; how often.
        self._revision = 0
        self.resumed = 0

    async def __aenter__(self) -> Completions:
        self._task = asyncio.create_task(self._read())
        # The initial-state bookmark says the stream is subscribed: nothing after it is missed.
        opened = asyncio.create_task(self._opened.wait())
        await asyncio.wait(
            [self._task, opened], timeout=CALL_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        opened.cancel()
        if self._task.done():
            self._task.result()
        if not self._opened.is_set():
            await self.__aexit__()
            raise TimeoutError("WatchStatus did not open in time")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self, within: float) -> list[float]:
        """Wait until every expected job completed; the receipt times."""
        assert self._task is not None
        try:
            async with asyncio.timeout(within):
                await asyncio.shield(self._task)
        except TimeoutError:
            raise TimeoutError(
                f"only {len(self.times)} of {self.expected} jobs completed in {within:.0f} s"
            ) from None
        return self.times

    async def _read(self) -> None:
        request = analysis_pb2.WatchStatusRequest(send_initial_state=True)
        while True:
            try:
                await self._read_stream(request)
                return
            except grpc.aio.AioRpcError as error:
                info = error_info(error)
                if info is None or info.reason != "WATCHER_TOO_SLOW":
                    raise
            # Cut off as too slow (a burst of submissions outran it): resume where it was,
            # as a client does.
            self.resumed += 1
            request = analysis_pb2.WatchStatusRequest(start_revision=self._revision)

    async def _read_stream(self, request: analysis_pb2.WatchStatusRequest) -> None:
        call = self._analysis.WatchStatus(request)
        try:
            async for response in call:
                now = time.perf_counter()
                if response.HasField("bookmark"):
                    if response.bookmark.initial_state_end:
                        self._revision = response.revision
                        self._opened.set()
                    continue
                change = response.change
                if change.initial_state:
                    continue
                self._revision = response.revision
                if change.status == _FAILED:
                    error = change.error
                    raise RuntimeError(
                        f"job {change.media_id} FAILED: {error.reason} {error.message}"
                    )
                if change.status == _COMPLETED and change.media_id not in self._completed:
                    self._completed.add(change.media_id)
                    self.times.append(now)
                    if len(self._completed) >= self.expected:
                        return
        finally:
            call.cancel()
        raise RuntimeError(f"WatchStatus ended after {len(self.times)} of {self.expected} jobs")
