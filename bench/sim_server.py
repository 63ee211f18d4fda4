"""mediatag's analysis service with the simulated analyser, as a process of its own.

It is built by ``analysis_service.server.create_server`` exactly as ``mediatag serve
analysis`` builds it, with only the analyser swapped for ``bench.simulated`` (the CLI
cannot choose a custom one), and it starts, serves health and drains on SIGTERM the same way.

Run: ``python -m bench.sim_server --port PORT --data-dir DIR --ingest-address ADDR ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from analysis_service.config import AnalysisConfig, WatchConfig
from analysis_service.server import create_server
from bench.simulated import SimulatedAnalyzer
from mediatag_common.grpc_server import serve_until_signal

_GRACE = 5.0


@dataclass(frozen=True)
class SimServer:
    """How to start one simulated analysis service; ``argv`` for ``python -m bench.sim_server``."""

    port: int
    data_dir: Path
    ingest_address: str
    workers: int
    latency: float
    # None: the simulated API has no limit.
    rate_per_second: float | None
    burst: int
    synchronous: str
    dimensions: int = 16
    # None: SQLite in ``data_dir``; else the database (e.g. PostgreSQL shared by replicas).
    database_url: str | None = None
    # Where to write the moment (``time.time()``) of each simulated API call, on SIGTERM.
    calls_file: Path | None = None
    max_watchers: int = WatchConfig().max_watchers

    def argv(self) -> list[str]:
        argv = [
            "-m", "bench.sim_server", "--port", str(self.port), "--data-dir", str(self.data_dir),
            "--ingest-address", self.ingest_address, "--workers", str(self.workers),
            "--latency", repr(self.latency), "--burst", str(self.burst),
            "--synchronous", self.synchronous, "--dimensions", str(self.dimensions),
            "--max-watchers", str(self.max_watchers),
        ]  # fmt: skip
        if self.rate_per_second is not None:
            argv += ["--rate", repr(self.rate_per_second)]
        if self.database_url is not None:
            argv += ["--database-url", self.database_url]
        if self.calls_file is not None:
            argv += ["--calls-file", str(self.calls_file)]
        return argv


async def serve(args: argparse.Namespace) -> None:
    config = AnalysisConfig(
        port=args.port,
        data_dir=args.data_dir,
        ingest_address=args.ingest_address,
        workers=args.workers,
        sqlite_synchronous=args.synchronous,
        database_url=args.database_url,
        # Every stream from one peer: the benchmark's watchers all come from one process.
        watch=WatchConfig(
            max_watchers=args.max_watchers, max_watchers_per_caller=args.max_watchers
        ),
        # The CLI serves metrics by default; port 0 keeps that cost without a port clash.
        metrics_port=0,
        grace_period=_GRACE,
    )
    analyzer = SimulatedAnalyzer(
        latency=args.latency,
        rate_per_second=args.rate,
        burst=args.burst,
        dimensions=args.dimensions,
    )
    host, _ = await create_server(config, analyzer=analyzer)
    await serve_until_signal([host], config.grace_period)
    if args.calls_file is not None:
        await asyncio.to_thread(args.calls_file.write_text, json.dumps(analyzer.calls))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_server", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--ingest-address", required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--latency", type=float, required=True, help="seconds per call")
    parser.add_argument("--rate", type=float, help="calls per second (default: no limit)")
    parser.add_argument("--burst", type=int, default=1)
    parser.add_argument("--synchronous", default="FULL", help="SQLite synchronous pragma")
    parser.add_argument("--dimensions", type=int, default=16)
    parser.add_argument("--database-url", help="default: SQLite in --data-dir")
    parser.add_argument("--calls-file", type=Path, help="JSON list of API call times, at exit")
    parser.add_argument("--max-watchers", type=int, default=WatchConfig().max_watchers)
    args = parser.parse_args(argv)
    # As the benchmarks run ``mediatag serve``: warnings only, so per-job lines cost nothing.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
