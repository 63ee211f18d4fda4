"""The seed benchmark's figures, its target, and how both are printed."""

from __future__ import annotations

from dataclasses import dataclass

from bench.seed_model import SEED_PAUSE, SeedRun, seed_time_to_last

OURS = "mediatag"
SEED = "seed"
LIMIT_TARGET = 0.95


@dataclass(frozen=True)
class Setup:
    """Where and with what the figures were measured."""

    cores: int | None
    platform: str
    python: str
    latency_seconds: float
    rate_limit_per_second: float
    burst: int
    images: int
    seed_model_images: int
    workers: int
    image_bytes: int
    sqlite_synchronous: str
    seed_pause_seconds: float = SEED_PAUSE


@dataclass(frozen=True)
class Row:
    """One design's figures; ``measured`` False when worked out rather than run."""

    name: str
    images: int
    measured: bool
    time_to_last_seconds: float
    jobs_per_second: float
    # Completions per second between the first and the last completion.
    sustained_jobs_per_second: float
    share_of_limit: float


@dataclass(frozen=True)
class OursMeasured:
    """mediatag's run: seconds from the first upload call."""

    upload_seconds: float
    first_completed_seconds: float
    last_completed_seconds: float


@dataclass(frozen=True)
class TargetCheck:
    description: str
    value: float
    holds: bool


@dataclass(frozen=True)
class SeedFigures:
    setup: Setup
    rows: list[Row]
    ours: OursMeasured
    jobs_per_second_ratio: float
    time_to_last_ratio: float
    share_of_ideal: float
    targets: list[TargetCheck]


def seed_figures(setup: Setup, seed_run: SeedRun, ours: OursMeasured) -> SeedFigures:
    """Rows for the seed model as run, the seed worked out at the full image count,
    mediatag as measured and the ideal under the limit; ratios mediatag / seed."""
    rate, latency, images = setup.rate_limit_per_second, setup.latency_seconds, setup.images
    seed_rate = 1 / (latency + SEED_PAUSE)
    seed_total = seed_time_to_last(images, latency)
    sustained = (images - 1) / (ours.last_completed_seconds - ours.first_completed_seconds)
    # The best any design can do: calls evenly spaced at the limit, the last one's latency.
    ideal = (images - 1) / rate + latency
    rows = [
        Row(
            f"{SEED} model (run)", seed_run.images, True, seed_run.time_to_last,
            seed_run.jobs_per_second, seed_run.sustained_jobs_per_second,
            seed_run.sustained_jobs_per_second / rate,
        ),
        Row(
            f"{SEED} (worked out)", images, False, seed_total,
            images / seed_total, seed_rate, seed_rate / rate,
        ),
        Row(
            OURS, images, True, ours.last_completed_seconds,
            images / ours.last_completed_seconds, sustained, sustained / rate,
        ),
        Row("ideal under the limit", images, False, ideal, images / ideal, rate, 1.0),
    ]  # fmt: skip
    ours_row = rows[2]
    targets = [
        TargetCheck(
            f"mediatag sustains at least {LIMIT_TARGET:.0%} of the API limit",
            ours_row.share_of_limit,
            ours_row.share_of_limit >= LIMIT_TARGET,
        )
    ]
    return SeedFigures(
        setup=setup,
        rows=rows,
        ours=ours,
        jobs_per_second_ratio=ours_row.jobs_per_second / seed_run.jobs_per_second,
        time_to_last_ratio=seed_total / ours_row.time_to_last_seconds,
        share_of_ideal=ideal / ours_row.time_to_last_seconds,
        targets=targets,
    )


def print_setup(setup: Setup) -> None:
    full_seed = seed_time_to_last(setup.images, setup.latency_seconds)
    lines = [
        "seed benchmark: the seed's design vs mediatag, one simulated analysis API",
        f"  machine   {setup.cores} cores, {setup.platform}, python {setup.python}",
        f"  API       {setup.latency_seconds:g} s per call, limit "
        f"{setup.rate_limit_per_second:g} calls/s (burst {setup.burst}), never fails",
        f"  {SEED:<9} in-memory model (bench.seed_model): one sequential worker, "
        f"{setup.seed_pause_seconds * 1000:.0f} ms pause between",
        f"            calls, all jobs enqueued at once; run on {setup.seed_model_images} images "
        f"(all {setup.images} would take {full_seed:.0f} s),",
        "            its time for all of them worked out: N x latency + (N-1) x pause",
        f"  {OURS:<9} `mediatag serve ingest` and the analysis service with the simulated analyser",
        f"            (bench.sim_server) as separate processes, {setup.workers} workers, SQLite "
        f"synchronous={setup.sqlite_synchronous};",
        f"            {setup.images} byte-distinct {setup.image_bytes / 1000:.1f} KB JPEGs "
        "sent with UploadMedia (32 per call, one call",
        "            at a time) through the whole pipeline: outbox, SubmitJobs, queue, "
        "ReadMediaContent,",
        "            limiter, analyser, result cache, WatchStatus",
        "  timing    first enqueue (seed) or first UploadMedia call (mediatag) to the last "
        "COMPLETED,",
        "            mediatag's as read from a WatchStatus stream in this process",
    ]
    print("\n".join(lines), flush=True)


def print_results(figures: SeedFigures) -> None:
    header = (
        f"  {'':<24}{'images':>7}{'time to last':>14}{'jobs/s':>9}{'sustained':>11}{'of limit':>10}"
    )
    lines = ["", header]
    for row in figures.rows:
        lines.append(
            f"  {row.name:<24}{row.images:>7}{row.time_to_last_seconds:>12.2f} s"
            f"{row.jobs_per_second:>9.2f}{row.sustained_jobs_per_second:>11.2f}"
            f"{row.share_of_limit:>10.1%}"
        )
    ours = figures.ours
    model = figures.rows[0]
    worked_out = seed_time_to_last(model.images, figures.setup.latency_seconds)
    lines += [
        "",
        f"  seed model: {model.time_to_last_seconds:.2f} s for {model.images} images, "
        f"{worked_out:.2f} s worked out",
        f"  mediatag: uploads answered after {ours.upload_seconds:.2f} s, first COMPLETED at "
        f"{ours.first_completed_seconds:.2f} s, last at {ours.last_completed_seconds:.2f} s",
        f"  mediatag / seed: {figures.jobs_per_second_ratio:.1f}x the jobs/s, last job done "
        f"{figures.time_to_last_ratio:.1f}x sooner (seed worked out at "
        f"{figures.setup.images} images)",
        f"  mediatag's time to last vs the ideal under the limit: {figures.share_of_ideal:.1%}"
        " (ideal = (N-1)/limit + latency)",
        "",
        "targets",
    ]
    lines += [
        f"  {'PASS' if check.holds else 'MISS'}  {check.description}: {check.value:.1%}"
        for check in figures.targets
    ]
    print("\n".join(lines), flush=True)
