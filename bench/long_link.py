"""Uploads over a long link: mediatag's ingest with its default stream window and with a
wider one, against a bare grpc.aio server, on loopback and through a proxy that delays every
byte each way.

mediatag's services turn gRPC's bandwidth probing off (README, Security): a stream's HTTP/2
window then stays ``--stream-window`` (64 KiB by default), opened by each message the service
asks to read, so over a long round trip a stream moves about one chunk per round trip, where
the bare server (gRPC's defaults, probing on) widens its window to what the link carries. And
a unary message larger than the window is read only once the call has room in the request
memory, a round trip or more for the rest of it, while the room admits two such reads at once
by default. This benchmark measures those prices side by side: MiB/s of one large
``UploadMedia`` and of ``UploadMediaStream`` in chunks of each size, and uploads/s of many
photos uploaded at once (``UploadMedia``, closed loop), alternating which server goes first in
each round.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from mediatag.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from bench.benchmark import Benchmark, Figures, positive
from bench.jpeg import photo_like_jpeg
from bench.load import run_closed_loop
from bench.processes import PACKAGE_PARENT, free_ports
from bench.upload import (
    MAX_MESSAGE_BYTES,
    Command,
    Level,
    Target,
    UniqueUploads,
    bare_command,
    ours_command,
    parse_levels,
    running,
)
from bench.upload_report import BARE, OURS
from ingest_service.config import IngestConfig
from mediatag_common.grpc_server import channel_options
from mediatag_common.values import (
    byte_size,
    format_byte_size,
    non_negative_float,
    positive_int,
)

MIB = 1024 * 1024
KIB = 1024
_CALL_TIMEOUT = 600.0
_PHOTO_SEED = 7


def _delays(text: str) -> list[float]:
    """Milliseconds, comma-separated, each zero or more."""
    return [non_negative_float(item) for item in text.split(",")]


def _chunks(text: str) -> list[int]:
    """KiB, comma-separated, each positive: the sizes in bytes."""
    return [positive_int(item) * KIB for item in text.split(",")]


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--link-delays-ms", type=_delays, default=_delays("0,10"), metavar="MS,...",
        help="one-way delays to measure; 0 is loopback without the proxy (default 0,10)",
    )  # fmt: skip
    group.add_argument(
        "--link-chunks-kib", type=_chunks, default=_chunks("64,256,1024"), metavar="KIB,...",
        help="UploadMediaStream chunk sizes (default 64,256,1024)",
    )  # fmt: skip
    group.add_argument(
        "--link-mib", type=positive, default=32, metavar="MIB",
        help="size of the large file (default 32)",
    )  # fmt: skip
    group.add_argument(
        "--link-photos", type=parse_levels, default=parse_levels("16:400"), metavar="C:N,...",
        help="photos uploaded at once, and how many per server and round (default 16:400)",
    )  # fmt: skip
    group.add_argument(
        "--link-photo-kb", type=positive, default=200, metavar="KB",
        help="approximate size of each photo (default 200)",
    )  # fmt: skip
    group.add_argument(
        "--link-stream-window", type=byte_size, default=MIB, metavar="SIZE",
        help="a second mediatag, started with --stream-window SIZE, measured beside the one "
        "with the default window (default 1MiB)",
    )  # fmt: skip
    group.add_argument(
        "--link-rounds", type=positive, default=3, metavar="N",
        help="rounds, alternating which server goes first; medians are printed (default 3)",
    )  # fmt: skip


class Videos:
    """MP4 files of one size, each with bytes of its own so that no upload is a duplicate."""

    def __init__(self, size: int) -> None:
        brand = b"isom" + struct.pack(">I", 512) + b"isomiso2avc1mp41"
        self._ftyp = struct.pack(">I", 8 + len(brand)) + b"ftyp" + brand
        self._payload = os.urandom(size - len(self._ftyp) - 8 - 8)
        self._number = 0

    def next(self) -> bytes:
        self._number += 1
        payload = struct.pack(">Q", self._number) + self._payload
        return self._ftyp + struct.pack(">I", 8 + len(payload)) + b"mdat" + payload


@dataclass(frozen=True)
class Link:
    """A server under test, reached through a channel of its own (directly, or through the
    delay proxy)."""

    name: str
    stub: ingest_pb2_grpc.IngestServiceAsyncStub

    async def upload(self, content: bytes, chunk_size: int | None) -> float:
        """MiB/s of one upload: unary when ``chunk_size`` is None, else streamed in chunks."""
        started = time.perf_counter()
        if chunk_size is None:
            request = ingest_pb2.UploadMediaRequest(
                owner_id="bench-owner",
                files=[ingest_pb2.MediaFile(filename="clip.mp4", content=content)],
            )
            await self.stub.UploadMedia(request, timeout=_CALL_TIMEOUT)
        else:
            await self.stub.UploadMediaStream(
                _stream_requests(content, chunk_size), timeout=_CALL_TIMEOUT
            )
        return len(content) / MIB / (time.perf_counter() - started)

    async def photos(self, photos: UniqueUploads, level: Level) -> float:
        """Uploads/s of ``level.requests`` one-photo ``UploadMedia`` calls, ``level.concurrency``
        at once."""
        target = Target(self.name, self.stub)
        result = await run_closed_loop(
            lambda: target.upload(photos), calls=level.requests, concurrency=level.concurrency
        )
        return result.calls_per_second


def _stream_requests(
    content: bytes, chunk_size: int
) -> Iterator[ingest_pb2.UploadMediaStreamRequest]:
    yield ingest_pb2.UploadMediaStreamRequest(
        header=ingest_pb2.UploadHeader(owner_id="bench-owner", filename="clip.mp4")
    )
    for offset in range(0, len(content), chunk_size):
        yield ingest_pb2.UploadMediaStreamRequest(chunk=content[offset : offset + chunk_size])


@dataclass(frozen=True)
class Mode:
    """One row: what is uploaded, and the figure it gives (its unit in ``name``)."""

    name: str
    measure: Callable[[Link], Awaitable[float]]


def _modes(args: argparse.Namespace, videos: Videos, photos: UniqueUploads) -> list[Mode]:
    large = f"{args.link_mib} MiB"

    def one_large(chunk_size: int | None) -> Callable[[Link], Awaitable[float]]:
        return lambda link: link.upload(videos.next(), chunk_size)

    def photos_at(level: Level) -> Callable[[Link], Awaitable[float]]:
        return lambda link: link.photos(photos, level)

    return [
        Mode(f"`UploadMedia` of {large} (MiB/s)", one_large(None)),
        *(
            Mode(f"stream of {large}, {size // KIB} KiB chunks (MiB/s)", one_large(size))
            for size in args.link_chunks_kib
        ),
        *(
            Mode(
                f"{level.concurrency} `UploadMedia` of a {args.link_photo_kb} KB photo at once "
                "(uploads/s)",
                photos_at(level),
            )
            for level in args.link_photos
        ),
    ]


@contextlib.asynccontextmanager
async def _link(
    name: str, work_dir: Path, server_port: int, proxy_port: int, delay_ms: float
) -> AsyncIterator[Link]:
    """A channel to the server on ``server_port``, through the delay proxy unless 0 ms."""
    async with contextlib.AsyncExitStack() as stack:
        port = server_port
        if delay_ms > 0:
            proxy = Command(
                [sys.executable, "-m", "bench.delay_proxy", "--listen", str(proxy_port),
                 "--target", str(server_port), "--delay", str(delay_ms / 1000)],
                cwd=PACKAGE_PARENT,
            )  # fmt: skip
            # Ready once a health check reaches the server through it.
            await stack.enter_async_context(
                running(f"{name}-proxy", proxy, work_dir, address=f"127.0.0.1:{proxy_port}")
            )
            port = proxy_port
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=channel_options(MAX_MESSAGE_BYTES)
            )
        )
        yield Link(name, ingest_pb2_grpc.IngestServiceStub(channel))


async def _measure(
    links: Sequence[Link], modes: Sequence[Mode], rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Each server's figure in each mode, once a round, the first server rotating."""
    measured: dict[str, dict[str, list[float]]] = {
        link.name: {mode.name: [] for mode in modes} for link in links
    }
    for round_number in range(rounds):
        shift = round_number % len(links)
        order = [*links[shift:], *links[:shift]]
        for mode in modes:
            for link in order:
                measured[link.name][mode.name].append(await mode.measure(link))
    return measured


async def run(args: argparse.Namespace) -> Figures:
    """Measure and print each delay's table; the figures for ``--json``."""
    videos = Videos(args.link_mib * MIB)
    photo = photo_like_jpeg(_PHOTO_SEED, target_bytes=args.link_photo_kb * 1000)
    modes = _modes(args, videos, UniqueUploads([photo]))
    default_window = format_byte_size(IngestConfig().stream_window)
    wide_window = format_byte_size(args.link_stream_window)
    wide = f"{OURS}, {wide_window} window"
    print(
        f"# long link: per server, mode and round one {args.link_mib} MiB upload, or "
        f"photos of {len(photo.content) // 1000} KB uploaded at once; {args.link_rounds} "
        "rounds, medians\n"
        f"cores {os.cpu_count()}, {platform.platform()}, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}; delays are one way, so a round trip adds twice as much; "
        f"the proxy limits no bandwidth\n{OURS}: its defaults (a {default_window} stream "
        f"window); {wide}: with --stream-window {wide_window}",
        flush=True,
    )
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="mediatag-bench-") as work:
        work_dir = Path(work)
        ours_port, wide_port, bare_port, unused_port, *proxy_ports = free_ports(7)
        # Its metrics on a port of its own: the other mediatag has the default one.
        wide_flags = ["--stream-window", str(args.link_stream_window), "--ingest-metrics-port", "0"]
        servers = [
            (OURS, ours_command(work_dir / OURS, ours_port, analysis_port=unused_port)),
            (wide, ours_command(work_dir / "wide", wide_port, analysis_port=unused_port,
                                flags=wide_flags)),
            (BARE, bare_command(work_dir, bare_port)),
        ]  # fmt: skip
        ports = [ours_port, wide_port, bare_port]
        async with contextlib.AsyncExitStack() as servers_running:
            for (name, command), port in zip(servers, ports, strict=True):
                await servers_running.enter_async_context(
                    running(name, command, work_dir, address=f"127.0.0.1:{port}")
                )
            for delay_ms in args.link_delays_ms:
                async with contextlib.AsyncExitStack() as links_open:
                    links = [
                        await links_open.enter_async_context(
                            _link(name, work_dir, port, proxy_port, delay_ms)
                        )
                        for (name, _), port, proxy_port in zip(
                            servers, ports, proxy_ports, strict=True
                        )
                    ]
                    for link in links:  # warm-up
                        await link.upload(videos.next(), None)
                    measured = await _measure(links, modes, args.link_rounds)
                figures[f"{delay_ms:g}ms"] = _print_table(delay_ms, links, modes, measured)
    return figures


def _print_table(
    delay_ms: float,
    links: Sequence[Link],
    modes: Sequence[Mode],
    measured: dict[str, dict[str, list[float]]],
) -> dict[str, dict[str, float]]:
    link = "loopback" if delay_ms == 0 else f"{delay_ms:g} ms each way ({2 * delay_ms:g} ms RTT)"
    names = [link.name for link in links]
    ours = [name for name in names if name != BARE]
    ratio_names = [f"{name} / {BARE}" for name in ours]
    print(f"\n## {link}\n\n| upload | {' | '.join(names)} | {' | '.join(ratio_names)} |")
    print("|---" * (1 + len(names) + len(ours)) + "|")
    rows: dict[str, dict[str, float]] = {}
    for mode in modes:
        medians = {name: statistics.median(measured[name][mode.name]) for name in names}
        ratios = [medians[name] / medians[BARE] for name in ours]
        print(
            f"| {mode.name} | {' | '.join(f'{medians[name]:.1f}' for name in names)} | "
            f"{' | '.join(f'{ratio:.2f}' for ratio in ratios)} |"
        )
        rows[mode.name] = medians
    return rows


BENCHMARK = Benchmark(
    name="link",
    summary="large uploads and many photos over loopback and a delayed link: mediatag with "
    "its default window and a wider one vs a bare server",
    add_arguments=add_arguments,
    run=run,
)
