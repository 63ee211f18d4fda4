"""The upload benchmark's figures, its targets, and how both are printed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bench.load import LoadResult

OURS = "mediatag"
BARE = "bare"
P50_TARGET = 2.0
THROUGHPUT_TARGET = 0.5
THROUGHPUT_TARGET_CONCURRENCY = 16
MIB = 1024 * 1024


@dataclass(frozen=True)
class Setup:
    """Where and with what the figures were measured."""

    cores: int | None
    platform: str
    python: str
    grpcio: str
    image_bytes: list[int]
    image_pixels: str
    jpeg_quality: list[int]
    max_message_bytes: int
    warmup_uploads: int
    rounds: int
    temp_dir: str
    analysis_service: str = "not running: the ingest outbox forwarder retries in the background"


@dataclass(frozen=True)
class ServerFigures:
    p50_ms: float
    p99_ms: float
    uploads_per_second: float

    @classmethod
    def of(cls, result: LoadResult) -> ServerFigures:
        return cls(
            p50_ms=result.percentile(50) * 1000,
            p99_ms=result.percentile(99) * 1000,
            uploads_per_second=result.calls_per_second,
        )


@dataclass(frozen=True)
class LevelFigures:
    """Both servers at one concurrency level; ratios are ours/bare."""

    concurrency: int
    uploads_per_server: int
    ours: ServerFigures
    bare: ServerFigures
    p50_ratio: float
    p99_ratio: float
    throughput_ratio: float

    @classmethod
    def of(cls, concurrency: int, ours: LoadResult, bare: LoadResult) -> LevelFigures:
        ours_figures, bare_figures = ServerFigures.of(ours), ServerFigures.of(bare)
        return cls(
            concurrency=concurrency,
            uploads_per_server=len(ours.latencies),
            ours=ours_figures,
            bare=bare_figures,
            p50_ratio=ours_figures.p50_ms / bare_figures.p50_ms,
            p99_ratio=ours_figures.p99_ms / bare_figures.p99_ms,
            throughput_ratio=ours_figures.uploads_per_second / bare_figures.uploads_per_second,
        )


@dataclass(frozen=True)
class TargetCheck:
    description: str
    ratio: float
    holds: bool


@dataclass(frozen=True)
class UploadFigures:
    setup: Setup
    levels: list[LevelFigures]
    targets: list[TargetCheck]


def upload_figures(setup: Setup, results: Mapping[int, Mapping[str, LoadResult]]) -> UploadFigures:
    """Figures and target checks from each level's results by server name."""
    levels = [
        LevelFigures.of(concurrency, by_server[OURS], by_server[BARE])
        for concurrency, by_server in results.items()
    ]
    return UploadFigures(setup, levels, _check_targets(levels))


def _check_targets(levels: Sequence[LevelFigures]) -> list[TargetCheck]:
    checks = []
    for level in levels:
        checks.append(
            TargetCheck(
                f"p50 at c={level.concurrency} within {P50_TARGET:g}x of bare",
                level.p50_ratio,
                level.p50_ratio <= P50_TARGET,
            )
        )
        if level.concurrency == THROUGHPUT_TARGET_CONCURRENCY:
            checks.append(
                TargetCheck(
                    f"uploads/s at c={level.concurrency} at least {THROUGHPUT_TARGET:g}x of bare",
                    level.throughput_ratio,
                    level.throughput_ratio >= THROUGHPUT_TARGET,
                )
            )
    return checks


def print_setup(setup: Setup) -> None:
    sizes, qualities = setup.image_bytes, setup.jpeg_quality
    lines = [
        "upload benchmark: UploadMedia, mediatag's ingest service vs a bare grpc.aio server",
        f"  machine   {setup.cores} cores, {setup.platform}, python {setup.python}, "
        f"grpcio {setup.grpcio}",
        f"  payload   {len(sizes)} JPEGs per upload, {setup.image_pixels}, "
        f"{min(sizes) / 1000:.0f}-{max(sizes) / 1000:.0f} KB each "
        f"(quality {min(qualities)}-{max(qualities)}), bytes unique per request (COM segment)",
        f"  {OURS:<9} `mediatag serve ingest --data-dir TMP --ingest-port PORT "
        "--analysis-address 127.0.0.1:UNUSED`, default settings (MEDIATAG_* variables unset)",
        "            the analysis service is deliberately not running: the ingest outbox "
        "forwarder retries in the background",
        f"  {BARE:<9} `python -m bench.bare_server`: deserialise, write each file "
        "(temp file, write, fsync, rename, fsync dir), answer the count",
        f"  both      subprocesses, max message {setup.max_message_bytes // MIB} MiB, data under "
        f"{setup.temp_dir}; client: this process, one grpc.aio channel per server",
        f"  method    {setup.warmup_uploads} warm-up uploads per server, then per level "
        f"{setup.rounds} rounds alternating which server goes first; 1 upload = 1 UploadMedia call",
    ]
    print("\n".join(lines), flush=True)


def print_results(figures: UploadFigures) -> None:
    header = f"  {'':<10}{'p50 ms':>10}{'p99 ms':>10}{'uploads/s':>12}"
    lines = []
    for level in figures.levels:
        lines += [
            "",
            f"concurrency {level.concurrency} ({level.uploads_per_server} uploads per server)",
            header,
            _server_row(OURS, level.ours),
            _server_row(BARE, level.bare),
            f"  {'ours/bare':<10}{level.p50_ratio:>9.2f}x{level.p99_ratio:>9.2f}x"
            f"{level.throughput_ratio:>11.2f}x",
        ]
    lines += ["", "targets"]
    lines += [
        f"  {'PASS' if check.holds else 'MISS'}  {check.description}: {check.ratio:.2f}x"
        for check in figures.targets
    ]
    print("\n".join(lines), flush=True)


def _server_row(name: str, figures: ServerFigures) -> str:
    return (
        f"  {name:<10}{figures.p50_ms:>10.1f}{figures.p99_ms:>10.1f}"
        f"{figures.uploads_per_second:>12.1f}"
    )
