"""UploadMedia: mediatag's ingest service against a bare grpc.aio server, side by side.

Both servers run as subprocesses on this machine and are measured alternately, in rounds
at each concurrency level, so machine noise hits both alike. Every request carries
byte-unique JPEGs, so neither server can skip a write by content addressing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import itertools
import os
import platform
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from mediatag.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from bench.benchmark import Benchmark, Figures, positive
from bench.jpeg import Jpeg, photo_like_jpeg, with_comment
from bench.load import LoadResult, run_closed_loop, split_evenly
from bench.processes import PACKAGE_PARENT, free_ports, running_server
from bench.upload_report import BARE, OURS, Setup, print_results, print_setup, upload_figures
from ingest_service.config import IngestConfig
from mediatag_common.grpc_server import channel_options

MAX_MESSAGE_BYTES = IngestConfig().max_message_bytes
_CALL_TIMEOUT = 60.0
_READY_TIMEOUT = 60.0
# Both servers drain on SIGTERM; with no calls in flight that takes well under this.
_STOP_TIMEOUT = 15.0
_ENV_PREFIX = "MEDIATAG_"


@dataclass(frozen=True)
class Level:
    """A concurrency level and how many uploads each server gets at it."""

    concurrency: int
    requests: int


def parse_levels(text: str) -> list[Level]:
    try:
        levels = [
            Level(int(concurrency), int(requests))
            for concurrency, requests in (item.split(":") for item in text.split(","))
        ]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected CONCURRENCY:UPLOADS[,...], got {text!r}"
        ) from None
    if any(level.concurrency < 1 or level.requests < 1 for level in levels):
        raise argparse.ArgumentTypeError("concurrency and uploads must be positive")
    if len({level.concurrency for level in levels}) != len(levels):
        raise argparse.ArgumentTypeError("each concurrency level once")
    return levels


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--upload-levels", type=parse_levels, default=parse_levels("1:200,16:800"),
        metavar="C:N,...",
        help="concurrency levels and uploads per server at each (default 1:200,16:800)",
    )  # fmt: skip
    group.add_argument(
        "--upload-rounds", type=positive, default=4, metavar="N",
        help="rounds per level, alternating which server goes first (default 4)",
    )  # fmt: skip
    group.add_argument(
        "--upload-warmup", type=positive, default=40, metavar="N",
        help="uploads per server before measuring (default 40)",
    )  # fmt: skip
    group.add_argument(
        "--upload-files", type=positive, default=5, metavar="N",
        help="images per upload (default 5)",
    )  # fmt: skip
    group.add_argument(
        "--upload-image-kb", type=positive, default=200, metavar="KB",
        help="approximate size of each image (default 200)",
    )  # fmt: skip


class UniqueUploads:
    """UploadMediaRequests whose images differ in bytes from those of every other request."""

    def __init__(self, images: Sequence[Jpeg]) -> None:
        self._images = images
        self._numbers = itertools.count()

    def next_request(self) -> ingest_pb2.UploadMediaRequest:
        number = next(self._numbers)
        files = [
            ingest_pb2.MediaFile(
                filename=f"photo-{index}.jpg",
                content_type="image/jpeg",
                content=with_comment(image.content, f"bench upload {number} file {index}".encode()),
            )
            for index, image in enumerate(self._images)
        ]
        return ingest_pb2.UploadMediaRequest(
            owner_id="bench-owner", category="Hair", context={"source": "bench"}, files=files
        )


@dataclass(frozen=True)
class Target:
    """A server under test, reached through its own channel."""

    name: str
    stub: ingest_pb2_grpc.IngestServiceAsyncStub

    async def upload(self, uploads: UniqueUploads) -> float:
        """One UploadMedia call; its latency in seconds (building the request excluded)."""
        request = uploads.next_request()
        started = time.perf_counter()
        response = await self.stub.UploadMedia(request, timeout=_CALL_TIMEOUT)
        latency = time.perf_counter() - started
        if response.count != len(request.files):
            raise RuntimeError(f"{self.name} stored {response.count} of {len(request.files)} files")
        return latency


async def run(args: argparse.Namespace) -> Figures:
    """Measure, print set-up, table and targets; the figures for ``--json``."""
    levels: list[Level] = args.upload_levels
    images = [
        photo_like_jpeg(seed, target_bytes=args.upload_image_kb * 1000)
        for seed in range(args.upload_files)
    ]
    setup = Setup(
        cores=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        grpcio=grpc.__version__,
        image_bytes=[len(image.content) for image in images],
        image_pixels=f"{images[0].width}x{images[0].height}",
        jpeg_quality=[image.quality for image in images],
        max_message_bytes=MAX_MESSAGE_BYTES,
        warmup_uploads=args.upload_warmup,
        rounds=args.upload_rounds,
        temp_dir=tempfile.gettempdir(),
    )
    print_setup(setup)

    uploads = UniqueUploads(images)
    results: dict[int, dict[str, LoadResult]] = {}
    with tempfile.TemporaryDirectory(prefix="mediatag-bench-") as work_dir:
        async with contextlib.AsyncExitStack() as servers:
            ours_port, unused_port, bare_port = free_ports(3)
            targets = [
                await servers.enter_async_context(
                    _serving_ours(Path(work_dir), ours_port, analysis_port=unused_port)
                ),
                await servers.enter_async_context(_serving_bare(Path(work_dir), bare_port)),
            ]
            warmup_concurrency = max(level.concurrency for level in levels)
            for target in targets:
                await run_closed_loop(
                    functools.partial(target.upload, uploads),
                    calls=args.upload_warmup,
                    concurrency=warmup_concurrency,
                )
            for level in levels:
                print(f"measuring at c={level.concurrency} ...", flush=True)
                results[level.concurrency] = await _measure_level(
                    targets, uploads, level, args.upload_rounds
                )

    figures = upload_figures(setup, results)
    print_results(figures)
    return dataclasses.asdict(figures)


@dataclass(frozen=True)
class Command:
    """How to start a server under test."""

    argv: list[str]
    cwd: Path | None = None
    env: dict[str, str] | None = None


def ours_command(
    work_dir: Path, port: int, *, analysis_port: int, flags: Sequence[str] = ()
) -> Command:
    """``mediatag serve ingest`` exactly as a user starts it, with ``flags``; nothing at
    ``analysis_port``."""
    mediatag = Path(sys.executable).parent / "mediatag"
    argv = [
        str(mediatag), "serve", "ingest", "--data-dir", str(work_dir / OURS),
        "--ingest-port", str(port), "--analysis-address", f"127.0.0.1:{analysis_port}", *flags,
    ]  # fmt: skip
    # Settings come from flags, then MEDIATAG_* variables: measure the defaults.
    env = {key: value for key, value in os.environ.items() if not key.startswith(_ENV_PREFIX)}
    return Command(argv, env=env)


def bare_command(work_dir: Path, port: int) -> Command:
    """The bare grpc.aio server (``bench.bare_server``)."""
    argv = [
        sys.executable, "-m", "bench.bare_server", "--port", str(port),
        "--data-dir", str(work_dir / BARE), "--max-message-bytes", str(MAX_MESSAGE_BYTES),
    ]  # fmt: skip
    return Command(argv, cwd=PACKAGE_PARENT)


def running(
    name: str, command: Command, work_dir: Path, *, address: str
) -> contextlib.AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """``command`` running until the block ends, entered once ``address`` is SERVING."""
    return running_server(
        name, command.argv, address=address, log_path=work_dir / f"{name}.log",
        ready_timeout=_READY_TIMEOUT, stop_timeout=_STOP_TIMEOUT, cwd=command.cwd,
        env=command.env,
    )  # fmt: skip


def _serving_ours(
    work_dir: Path, port: int, *, analysis_port: int
) -> contextlib.AbstractAsyncContextManager[Target]:
    command = ours_command(work_dir, port, analysis_port=analysis_port)
    return _serving(OURS, command, work_dir, port=port)


def _serving_bare(work_dir: Path, port: int) -> contextlib.AbstractAsyncContextManager[Target]:
    return _serving(BARE, bare_command(work_dir, port), work_dir, port=port)


@contextlib.asynccontextmanager
async def _serving(
    name: str, command: Command, work_dir: Path, *, port: int
) -> AsyncIterator[Target]:
    address = f"127.0.0.1:{port}"
    options = channel_options(MAX_MESSAGE_BYTES)
    async with (
        running(name, command, work_dir, address=address),
        grpc.aio.insecure_channel(address, options=options) as channel,
    ):
        yield Target(name, ingest_pb2_grpc.IngestServiceStub(channel))


async def _measure_level(
    targets: Sequence[Target], uploads: UniqueUploads, level: Level, rounds: int
) -> dict[str, LoadResult]:
    """``level.requests`` uploads per server, in rounds alternating which server goes first."""
    measured = {target.name: LoadResult([], 0.0) for target in targets}
    for round_number, calls in enumerate(split_evenly(level.requests, rounds)):
        order = targets if round_number % 2 == 0 else targets[::-1]
        for target in order:
            measured[target.name] += await run_closed_loop(
                functools.partial(target.upload, uploads),
                calls=calls,
                concurrency=level.concurrency,
            )
    return measured


BENCHMARK = Benchmark(
    name="upload",
    summary="UploadMedia of JPEG batches: mediatag ingest vs a bare grpc.aio server",
    add_arguments=add_arguments,
    run=run,
)
