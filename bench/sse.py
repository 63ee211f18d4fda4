"""Server-Sent Events through the web gateway beside WatchStatus, in the same run.

The three parts of mediatag run as subprocesses (``mediatag serve analysis|ingest|web``), so
the gateway's memory is its own. The queue is filled while paused; N SSE connections to the
gateway (plain HTTP clients, one filter) and N WatchStatus streams to the analysis service
(the fan-out benchmark's client) open; the gateway's memory with them idle, against before,
gives its cost per idle SSE connection. Then the queue runs with no rate limit and both kinds
of client record, for each change, the delay from its commit (``event_time``) to its receipt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import aiohttp
import grpc
from mediatag.analysis.v1 import analysis_pb2, analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2_grpc

from bench.benchmark import Benchmark, Figures, positive
from bench.fanout import count_of, pause_and_settle, steady_rss, until_status, upload_copies
from bench.jpeg import photo_like_jpeg
from bench.processes import free_ports, rss_bytes, running_server
from bench.watchers import watching
from mediatag_common.grpc_server import channel_options

_READY_TIMEOUT = 60.0
_STOP_TIMEOUT = 20.0
_CALL_TIMEOUT = 60.0
_ENV_PREFIX = "MEDIATAG_"
_RATE_LIMIT = "local=100000:1000"
_OWNER = "bench-owner"
_PENDING = analysis_pb2.PROCESSING_STATUS_PENDING
# What the SSE clients read of each change's JSON: its commit time.
_EVENT_TIME = re.compile(rb'"eventTime":"([^"]+)"')
# Delays are compared at these percentiles; the target is on p99.
_TARGET_RATIO = 1.5


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--sse-clients", type=positive, default=1000, metavar="N",
        help="SSE connections, and WatchStatus streams beside them (default 1000 each)",
    )  # fmt: skip
    group.add_argument(
        "--sse-seconds", type=positive, default=20, metavar="S",
        help="measured window (default 20)",
    )  # fmt: skip
    group.add_argument(
        "--sse-jobs", type=positive, default=1500, metavar="N",
        help="images queued before the run (default 1500)",
    )  # fmt: skip


class SseClients:
    """N SSE connections of one filter, recording each change's delay (ns)."""

    def __init__(self, url: str, count: int) -> None:
        self._url = url
        self._count = count
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._tasks: list[asyncio.Task[None]] = []
        self._opened = 0
        self._all_open = asyncio.Event()
        self.delays_ns: list[int] = []
        self.recording = False
        self.ended = 0

    async def open(self) -> None:
        self._tasks = [asyncio.create_task(self._read()) for _ in range(self._count)]
        await self._all_open.wait()

    async def _read(self) -> None:
        try:
            async with self._session.get(self._url, timeout=aiohttp.ClientTimeout()) as response:
                response.raise_for_status()
                self._opened += 1
                if self._opened == self._count:
                    self._all_open.set()
                async for line in response.content:
                    if line.startswith(b"data: ") and b'"change"' in line:
                        self._record(line, time.time_ns())
        except (TimeoutError, aiohttp.ClientError):
            self.ended += 1
            self._all_open.set()

    def _record(self, line: bytes, received_ns: int) -> None:
        if not self.recording:
            return
        found = _EVENT_TIME.search(line)
        if found is None:
            return
        committed = datetime.fromisoformat(found.group(1).decode())
        self.delays_ns.append(received_ns - int(committed.timestamp() * 1e9))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._session.close()


def _percentile(values: list[int], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] / 1e6


def _serve(work_dir: Path, service: str, ports: dict[str, int], clients: int) -> list[str]:
    mediatag = Path(sys.executable).parent / "mediatag"
    argv = [
        str(mediatag), "serve", service, "--data-dir", str(work_dir),
        "--analysis-port", str(ports["analysis"]), "--ingest-port", str(ports["ingest"]),
        "--log-level", "WARNING",
    ]  # fmt: skip
    if service == "analysis":
        argv += [
            "--workers", "4", "--rate-limit", _RATE_LIMIT,
            "--max-watchers", str(clients + 100), "--max-watchers-per-caller", str(clients + 100),
        ]  # fmt: skip
    if service == "web":
        argv += ["--web-port", str(ports["web"]), "--max-event-streams", str(clients + 100)]
    return argv


@contextlib.asynccontextmanager
async def _gateway(
    argv: list[str], url: str, log_path: Path, env: dict[str, str]
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``mediatag serve web`` until the block ends; entered once it answers HTTP."""
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=env
        )
    try:
        async with asyncio.timeout(_READY_TIMEOUT), aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{url}/api/v1/session") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield process
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()


async def run(args: argparse.Namespace) -> Figures:
    clients = args.sse_clients
    image = photo_like_jpeg(0, target_bytes=15_000, width=320, height=240)
    print(
        f"sse: {clients} SSE connections (filter owner_id={_OWNER}) beside {clients} "
        f"WatchStatus streams, {args.sse_jobs} jobs, {args.sse_seconds} s window, "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    ports = dict(zip(("analysis", "ingest", "web"), free_ports(3), strict=True))
    env = {key: value for key, value in os.environ.items() if not key.startswith(_ENV_PREFIX)}
    env |= {"MEDIATAG_INGEST_METRICS_PORT": "off", "MEDIATAG_ANALYSIS_METRICS_PORT": "off"}
    url = f"http://127.0.0.1:{ports['web']}"
    with tempfile.TemporaryDirectory(prefix="mediatag-bench-sse-") as work:
        work_dir = Path(work)
        async with contextlib.AsyncExitStack() as stack:
            for service in ("analysis", "ingest"):
                await stack.enter_async_context(
                    running_server(
                        service,
                        _serve(work_dir, service, ports, clients),
                        address=f"127.0.0.1:{ports[service]}",
                        log_path=work_dir / f"{service}.log",
                        ready_timeout=_READY_TIMEOUT,
                        stop_timeout=_STOP_TIMEOUT,
                        env=env,
                    )
                )
            gateway = await stack.enter_async_context(
                _gateway(_serve(work_dir, "web", ports, clients), url, work_dir / "web.log", env)
            )
            address = f"127.0.0.1:{ports['analysis']}"
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(address, options=channel_options())
            )
            ingest_channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{ports['ingest']}")
            )
            queue = analysis_pb2_grpc.AnalysisServiceStub(channel)
            await queue.PauseQueue(analysis_pb2.PauseQueueRequest(), timeout=_CALL_TIMEOUT)
            await upload_copies(
                ingest_pb2_grpc.IngestServiceStub(ingest_channel), image.content, args.sse_jobs
            )
            await until_status(queue, lambda status: count_of(status, _PENDING) >= args.sse_jobs)

            rss_before = await steady_rss(gateway.pid)
            sse = SseClients(f"{url}/api/v1/events?owner_id={_OWNER}", clients)
            await sse.open()
            rss_idle = await steady_rss(gateway.pid)
            watchers = await stack.enter_async_context(
                watching(address, count=clients, channels=10, open_timeout=_CALL_TIMEOUT)
            )
            await queue.ResumeQueue(analysis_pb2.ResumeQueueRequest(), timeout=_CALL_TIMEOUT)
            await asyncio.sleep(2.0)
            sse.recording = True
            start_ns = time.time_ns()
            await asyncio.sleep(args.sse_seconds)
            sse.recording = False
            end_ns = time.time_ns()
            rss_busy = rss_bytes(gateway.pid)
            await pause_and_settle(queue)
            await sse.close()
    grpc_delays = [
        received - committed
        for committed, received in zip(
            watchers.receipts.committed_ns, watchers.receipts.received_ns, strict=True
        )
        if start_ns <= received <= end_ns
    ]
    figures = {
        "clients": clients,
        "changes_per_second": len(sse.delays_ns) / clients / ((end_ns - start_ns) / 1e9),
        "sse_p50_ms": _percentile(sse.delays_ns, 0.50),
        "sse_p99_ms": _percentile(sse.delays_ns, 0.99),
        "watch_p50_ms": _percentile(grpc_delays, 0.50),
        "watch_p99_ms": _percentile(grpc_delays, 0.99),
        "gateway_kib_per_idle_sse": (rss_idle - rss_before) / clients / 1024,
        "gateway_rss_mib": {
            "before": rss_before / 2**20,
            "idle": rss_idle / 2**20,
            "busy": rss_busy / 2**20,
        },
        "sse_ended": sse.ended,
    }
    ratio = figures["sse_p99_ms"] / figures["watch_p99_ms"]
    figures["p99_ratio"] = ratio
    print(f"  changes/s (per client): {figures['changes_per_second']:.1f}")
    print(
        f"  delay commit -> receipt  SSE p50 {figures['sse_p50_ms']:.0f} ms, "
        f"p99 {figures['sse_p99_ms']:.0f} ms | WatchStatus p50 {figures['watch_p50_ms']:.0f} "
        f"ms, p99 {figures['watch_p99_ms']:.0f} ms"
    )
    print(
        f"  gateway memory: {figures['gateway_kib_per_idle_sse']:.1f} KiB per idle SSE "
        f"connection (RSS {rss_before / 2**20:.0f} -> {rss_idle / 2**20:.0f} MiB; "
        f"{rss_busy / 2**20:.0f} MiB busy)"
    )
    verdict = "PASS" if ratio <= _TARGET_RATIO else "MISS"
    print(f"  {verdict}: SSE p99 {ratio:.2f}x WatchStatus p99 (target {_TARGET_RATIO}x)")
    if sse.ended:
        print(f"  warning: {sse.ended} SSE connections ended early")
    return figures


BENCHMARK = Benchmark(
    name="sse",
    summary="Server-Sent Events through the web gateway beside WatchStatus streams",
    add_arguments=add_arguments,
    run=run,
)
