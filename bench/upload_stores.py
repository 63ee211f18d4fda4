"""UploadMedia with the blobs in each store: the local directory, Cloud Storage, S3.

The same ``mediatag serve ingest`` three times, its blobs in its data directory, in
gcp-storage-emulator and in moto's S3 server (both on loopback), measured alternately in
rounds at each concurrency level like the upload benchmark. Figures are ratios to the local
directory in the same run. There is no target: an emulator measures itself (Python, on the
same two cores), not the cloud, whose round trips are longer and whose throughput is not
bounded by this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
from pathlib import Path

from bench import emulators
from bench.benchmark import Benchmark, Figures, positive
from bench.jpeg import photo_like_jpeg
from bench.load import LoadResult, run_closed_loop
from bench.processes import free_ports
from bench.upload import (
    Level,
    Target,
    UniqueUploads,
    _measure_level,
    _serving,
    ours_command,
    parse_levels,
)

BUCKET = "mediatag-bench"
LOCAL = "file"
STORES = (LOCAL, "gs", "s3")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--stores-levels", type=parse_levels, default=parse_levels("1:100,8:200"),
        metavar="C:N,...",
        help="concurrency levels and uploads per store at each (default 1:100,8:200)",
    )  # fmt: skip
    group.add_argument(
        "--stores-rounds", type=positive, default=2, metavar="N",
        help="rounds per level, rotating which store goes first (default 2)",
    )  # fmt: skip


async def run(args: argparse.Namespace) -> Figures:
    levels: list[Level] = args.stores_levels
    images = [photo_like_jpeg(seed, target_bytes=200_000) for seed in range(5)]
    uploads = UniqueUploads(images)
    print(f"UploadMedia of 5 x {len(images[0].content) // 1000} KB JPEGs; stores: local "
          "directory, gcp-storage-emulator, moto S3 server (loopback)")  # fmt: skip
    results: dict[int, dict[str, LoadResult]] = {}
    with tempfile.TemporaryDirectory(prefix="mediatag-bench-stores-") as work:
        work_dir = Path(work)
        gcs_port, s3_port, *ports = free_ports(2 + 2 * len(STORES))
        gcs = emulators.cloud_storage_emulator(gcs_port, BUCKET, work_dir / "gcs.log")
        s3 = emulators.s3_emulator(s3_port, BUCKET, work_dir / "s3.log")
        try:
            async with contextlib.AsyncExitStack() as servers:
                targets = [
                    await servers.enter_async_context(
                        _serving_with_store(work_dir, store, ports[2 * n], ports[2 * n + 1],
                                            gcs=gcs, s3=s3)
                    )
                    for n, store in enumerate(STORES)
                ]  # fmt: skip
                for target in targets:
                    await run_closed_loop(
                        functools.partial(target.upload, uploads), calls=20, concurrency=16
                    )
                for level in levels:
                    print(f"measuring at c={level.concurrency} ...", flush=True)
                    results[level.concurrency] = await _measure_level(
                        targets, uploads, level, args.stores_rounds
                    )
        finally:
            gcs.close()
            s3.close()
    return _report(results)


def _serving_with_store(
    work_dir: Path,
    store: str,
    port: int,
    analysis_port: int,
    *,
    gcs: emulators.Emulator,
    s3: emulators.Emulator,
) -> contextlib.AbstractAsyncContextManager[Target]:
    flags = ["--ingest-metrics-port", "off"]
    environment: dict[str, str] = {}
    if store == "gs":
        flags += ["--blob-store", f"gs://{BUCKET}/bench"]
        environment["STORAGE_EMULATOR_HOST"] = gcs.url
    elif store == "s3":
        flags += ["--blob-store", f"s3://{BUCKET}/bench", "--blob-store-endpoint", s3.url]
        environment.update(emulators.AWS_TEST_ENVIRONMENT)
    command = ours_command(work_dir / store, port, analysis_port=analysis_port, flags=flags)
    assert command.env is not None
    command.env.update(environment)
    return _serving(store, command, work_dir, port=port)


def _report(results: dict[int, dict[str, LoadResult]]) -> Figures:
    figures: dict[str, object] = {}
    print(f"{'':>8} {'store':>6} {'p50 ms':>8} {'p99 ms':>8} {'uploads/s':>10}   ratio to local")
    for concurrency, measured in results.items():
        local = measured[LOCAL]
        for store in STORES:
            result = measured[store]
            p50, p99 = result.percentile(50), result.percentile(99)
            rate = result.calls_per_second
            ratios = (
                p50 / local.percentile(50),
                p99 / local.percentile(99),
                rate / local.calls_per_second,
            )
            print(
                f"c={concurrency:<6} {store:>6} {p50 * 1000:8.1f} {p99 * 1000:8.1f} {rate:10.1f}"
                f"   p50 {ratios[0]:.2f}x, p99 {ratios[1]:.2f}x, uploads/s {ratios[2]:.2f}x"
            )
            figures[f"c{concurrency}_{store}"] = {
                "p50_ms": p50 * 1000, "p99_ms": p99 * 1000, "uploads_per_s": rate,
                "p50_ratio": ratios[0], "p99_ratio": ratios[1], "throughput_ratio": ratios[2],
            }  # fmt: skip
    return figures


BENCHMARK = Benchmark(
    name="upload-stores",
    summary="UploadMedia with the blobs in the local directory, Cloud Storage and S3 "
    "(emulators); ratios to the local directory",
    add_arguments=add_arguments,
    run=run,
)
