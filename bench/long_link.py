"""Uploads over a long link: MiB/s of one large upload, mediatag's ingest against a bare
grpc.aio server, on loopback and through a proxy that delays every byte each way.

mediatag's services turn gRPC's bandwidth probing off (README, Security): a stream's HTTP/2
window then stays 64 KiB, opened by each message the service asks to read, so over a long
round trip a stream moves about one chunk per round trip, where the bare server (gRPC's
defaults, probing on) widens its window to what the link carries. This benchmark measures that
price side by side: one ``UploadMedia`` of the whole file, and ``UploadMediaStream`` in chunks
of each size, alternating which server goes first in each round.
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
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from mediatag.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from bench.benchmark import Benchmark, Figures, positive
from bench.processes import PACKAGE_PARENT, free_ports
from bench.upload import MAX_MESSAGE_BYTES, Command, bare_command, ours_command, running
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
UNARY = "UploadMedia"


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
        help="size of the uploaded file (default 32)",
    )  # fmt: skip
    group.add_argument(
        "--link-stream-window", type=byte_size, default=None, metavar="SIZE",
        help="start mediatag with --stream-window SIZE (default: its default, 64 KiB)",
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


def _stream_requests(
    content: bytes, chunk_size: int
) -> Iterator[ingest_pb2.UploadMediaStreamRequest]:
    yield ingest_pb2.UploadMediaStreamRequest(
        header=ingest_pb2.UploadHeader(owner_id="bench-owner", filename="clip.mp4")
    )
    for offset in range(0, len(content), chunk_size):
        yield ingest_pb2.UploadMediaStreamRequest(chunk=content[offset : offset + chunk_size])


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


Modes = Sequence[int | None]


async def _measure(
    links: Sequence[Link], videos: Videos, modes: Modes, rounds: int
) -> dict[str, dict[int | None, list[float]]]:
    """MiB/s of each server in each mode, once a round, the first server alternating."""
    measured: dict[str, dict[int | None, list[float]]] = {
        link.name: {mode: [] for mode in modes} for link in links
    }
    for round_number in range(rounds):
        order = links if round_number % 2 == 0 else links[::-1]
        for mode in modes:
            for link in order:
                measured[link.name][mode].append(await link.upload(videos.next(), mode))
    return measured


def _mode_name(mode: int | None) -> str:
    return UNARY if mode is None else f"UploadMediaStream, {mode // KIB} KiB chunks"


async def run(args: argparse.Namespace) -> Figures:
    """Measure and print each delay's table; the figures for ``--json``."""
    modes: list[int | None] = [None, *args.link_chunks_kib]
    videos = Videos(args.link_mib * MIB)
    print(
        f"# long link: one {args.link_mib} MiB upload per server, mode and round; "
        f"{args.link_rounds} rounds, medians\n"
        f"cores {os.cpu_count()}, {platform.platform()}, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}; delays are one way, so a round trip adds twice as much; "
        "the proxy limits no bandwidth",
        flush=True,
    )
    window = args.link_stream_window
    window_flags = [] if window is None else ["--stream-window", str(window)]
    shown = format_byte_size(window or IngestConfig().stream_window)
    print(f"mediatag's stream window: {shown}", flush=True)
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="mediatag-bench-") as work:
        work_dir = Path(work)
        ours_port, bare_port, unused_port, *proxy_ports = free_ports(5)
        async with (
            running(OURS, ours_command(work_dir, ours_port, analysis_port=unused_port,
                                       flags=window_flags), work_dir,
                    address=f"127.0.0.1:{ours_port}"),
            running(BARE, bare_command(work_dir, bare_port), work_dir,
                    address=f"127.0.0.1:{bare_port}"),
        ):  # fmt: skip
            for delay_ms in args.link_delays_ms:
                async with (
                    _link(OURS, work_dir, ours_port, proxy_ports[0], delay_ms) as ours,
                    _link(BARE, work_dir, bare_port, proxy_ports[1], delay_ms) as bare,
                ):
                    await ours.upload(videos.next(), None)  # warm-up
                    await bare.upload(videos.next(), None)
                    measured = await _measure([ours, bare], videos, modes, args.link_rounds)
                figures[f"{delay_ms:g}ms"] = _print_table(delay_ms, modes, measured)
    return figures


def _print_table(
    delay_ms: float, modes: Modes, measured: dict[str, dict[int | None, list[float]]]
) -> dict[str, dict[str, float]]:
    link = "loopback" if delay_ms == 0 else f"{delay_ms:g} ms each way ({2 * delay_ms:g} ms RTT)"
    print(f"\n## {link}\n\n| upload | {OURS} MiB/s | {BARE} MiB/s | {OURS} / {BARE} |")
    print("|---|---|---|---|")
    rows: dict[str, dict[str, float]] = {}
    for mode in modes:
        ours = statistics.median(measured[OURS][mode])
        bare = statistics.median(measured[BARE][mode])
        print(f"| {_mode_name(mode)} | {ours:.1f} | {bare:.1f} | {ours / bare:.2f} |")
        rows[_mode_name(mode)] = {OURS: ours, BARE: bare}
    return rows


BENCHMARK = Benchmark(
    name="link",
    summary="one large upload over loopback and a delayed link: mediatag vs a bare server",
    add_arguments=add_arguments,
    run=run,
)
