"""``python -m bench``: run every benchmark (or ``--only NAME``), print, optionally save JSON.

Benchmarks print PASS/MISS against their targets; a miss is a figure, not a failure, so the
exit status is 0 unless a benchmark could not run at all. SIGINT and SIGTERM stop the run
after its servers are stopped and its temp files removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import (
    fanout,
    long_link,
    owner_probes,
    queue_overhead,
    scale,
    seed,
    sse,
    upload,
    upload_stores,
)
from bench.benchmark import Benchmark, Figures

BENCHMARKS: list[Benchmark] = [
    upload.BENCHMARK,
    upload_stores.BENCHMARK,
    long_link.BENCHMARK,
    fanout.BENCHMARK,
    seed.BENCHMARK,
    queue_overhead.BENCHMARK,
    sse.BENCHMARK,
    owner_probes.BENCHMARK,
    scale.BENCHMARK,
]
# Exit status when interrupted, as shells report SIGINT.
_INTERRUPTED = 130

logger = logging.getLogger("bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run mediatag's benchmarks and print their figures and PASS/MISS per "
        "target. Misses do not change the exit status.",
    )
    names = [benchmark.name for benchmark in BENCHMARKS]
    parser.add_argument(
        "--only", action="append", choices=names, metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(names)}",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    for benchmark in BENCHMARKS:
        benchmark.add_arguments(
            parser.add_argument_group(f"{benchmark.name} benchmark", benchmark.summary)
        )
    return parser


async def _run(benchmark: Benchmark, args: argparse.Namespace) -> Figures:
    """Run ``benchmark``; SIGTERM cancels it (asyncio.run already does so for SIGINT)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await benchmark.run(args)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    selected = [b for b in BENCHMARKS if args.only is None or b.name in args.only]
    figures: dict[str, Figures] = {}
    failed: list[str] = []
    for benchmark in selected:
        try:
            figures[benchmark.name] = asyncio.run(_run(benchmark, args))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print(f"interrupted during the {benchmark.name} benchmark", file=sys.stderr)
            return _INTERRUPTED
        except Exception:
            logger.exception("the %s benchmark could not run", benchmark.name)
            failed.append(benchmark.name)
        print(flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}")
    if failed:
        print(f"could not run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
