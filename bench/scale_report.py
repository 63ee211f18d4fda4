"""The scale benchmark's figures, its targets, and how they are printed."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Targets of issue 11.
PROCRASTINATE_FACTOR = 5.0
SQLITE_QUEUE_JOBS_PER_SECOND = 2000.0
ONE_REPLICA_JOBS_PER_SECOND = 500.0
LIMIT_SHARE = 0.95
WATCH_DELAY_FACTOR = 2.0
# The processes whose CPU is the watchers' share (see ApartFigures).
WATCHERS_REPLICA = "watchers' replica"
WATCHERS_CLIENT = "watchers' client"


@dataclass(frozen=True)
class Row:
    """One configuration: jobs/s, CPU seconds by process; ``error`` when it could not run."""

    name: str
    jobs: int = 0
    seconds: float = 0.0
    cpu_seconds: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def jobs_per_second(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0

    def cpu_ms_per_job(self) -> dict[str, float]:
        return {role: used * 1000 / self.jobs for role, used in self.cpu_seconds.items()}


@dataclass(frozen=True)
class SeedFigures:
    replicas: int
    limit_per_second: float
    burst: int
    images: int
    sustained_per_second: float
    max_calls_in_one_second: int
    calls: int

    @property
    def share_of_limit(self) -> float:
        return self.sustained_per_second / self.limit_per_second


@dataclass(frozen=True)
class DelayFigures:
    """Commit to receipt, in milliseconds, of the changes a watcher read."""

    where: str
    changes: int
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, where: str, delays_ms: Sequence[float]) -> DelayFigures:
        if len(delays_ms) < 2:
            return cls(where, len(delays_ms), float("nan"), float("nan"))
        percentiles = statistics.quantiles(delays_ms, n=100, method="inclusive")
        return cls(where, len(delays_ms), percentiles[49], percentiles[98])


def median_row(rows: Sequence[Row]) -> Row:
    """The row of median jobs/s among those that ran (or the first's error)."""
    ran = sorted((row for row in rows if row.error is None), key=lambda row: row.jobs_per_second)
    return ran[(len(ran) - 1) // 2] if ran else rows[0]


@dataclass(frozen=True)
class ApartRound:
    """The workers' replica alone, and with the watchers on another replica; what the
    watchers read (changes, and from when to when, in seconds from the phase's start) and how
    many streams the server ended, by status code."""

    alone: Row
    watched: Row
    changes_read: int
    read_from: float
    read_until: float
    streams_ended: Mapping[str, int]


@dataclass(frozen=True)
class ApartFigures:
    """``watchers`` on a replica without workers, round by round; each phase's median."""

    watchers: int
    cores: int
    rounds: Sequence[ApartRound]

    @property
    def alone(self) -> Row:
        return median_row([measured.alone for measured in self.rounds])

    @property
    def watched(self) -> Row:
        return median_row([measured.watched for measured in self.rounds])

    @property
    def loss(self) -> float:
        return 1 - self.watched.jobs_per_second / self.alone.jobs_per_second

    @property
    def watchers_share(self) -> float:
        """The share of the cores the watchers' replica and the watchers' client took."""
        return watchers_share(self.watched, self.cores)


def watchers_share(watched: Row, cores: int) -> float:
    used = watched.cpu_seconds
    taken = used.get(WATCHERS_REPLICA, 0.0) + used.get(WATCHERS_CLIENT, 0.0)
    return taken / watched.seconds / cores


@dataclass(frozen=True)
class Target:
    description: str
    holds: bool


@dataclass
class ScaleFigures:
    setup: Mapping[str, object]
    queue: list[Row] = field(default_factory=list)
    pipeline: list[Row] = field(default_factory=list)
    seed: SeedFigures | str | None = None
    delays: list[DelayFigures] | str | None = None
    apart: ApartFigures | str | None = None
    targets: list[Target] = field(default_factory=list)


def _row_line(row: Row, base: Row | None) -> str:
    if row.error is not None:
        return f"  {row.name:<34} could not run: {row.error}"
    ratio = f"{row.jobs_per_second / base.jobs_per_second:>7.2f}x" if base and base.jobs else ""
    cpu = ", ".join(f"{role} {ms:.2f}" for role, ms in row.cpu_ms_per_job().items())
    return (
        f"  {row.name:<34}{row.jobs:>7}{row.seconds:>9.2f}{row.jobs_per_second:>10.1f}{ratio:>9}"
        f"   {cpu}"
    )


def print_rows(title: str, rows: Sequence[Row], base: Row | None) -> None:
    """A table of rows, each one's jobs/s as a ratio to ``base``'s."""
    header = f"  {'':<34}{'jobs':>7}{'seconds':>9}{'jobs/s':>10}{'ratio':>9}   CPU ms per job"
    ratio_of = f" (ratio: to {base.name})" if base else ""
    print(f"\n{title}{ratio_of}\n{header}", flush=True)
    for row in rows:
        print(_row_line(row, base), flush=True)


def print_seed(seed: SeedFigures | str) -> None:
    print("\nseed: one global limit over the replicas", flush=True)
    if isinstance(seed, str):
        print(f"  could not run: {seed}", flush=True)
        return
    print(
        f"  {seed.replicas} replicas, limit {seed.limit_per_second:g}/s burst {seed.burst}, "
        f"{seed.images} images: sustained {seed.sustained_per_second:.2f} calls/s = "
        f"{seed.share_of_limit:.1%} of the limit; at most {seed.max_calls_in_one_second} "
        f"calls in any 1 s (limit + burst = {seed.limit_per_second + seed.burst:g}); "
        f"{seed.calls} calls in all",
        flush=True,
    )


def print_delays(delays: Sequence[DelayFigures] | str) -> None:
    print("\nwatch delay: commit to receipt by a watcher", flush=True)
    if isinstance(delays, str):
        print(f"  could not run: {delays}", flush=True)
        return
    for figures in delays:
        print(
            f"  {figures.where:<44} {figures.changes:>6} changes   p50 {figures.p50_ms:7.2f} ms"
            f"   p99 {figures.p99_ms:7.2f} ms",
            flush=True,
        )
    if len(delays) == 2:
        print(f"  p99 other / same: {delays[0].p99_ms / delays[1].p99_ms:.2f}x", flush=True)


def print_apart(apart: ApartFigures | str) -> None:
    print("\nwatchers apart from workers", flush=True)
    if isinstance(apart, str):
        print(f"  could not run: {apart}", flush=True)
        return
    for number, measured in enumerate(apart.rounds, 1):
        ended = ", ".join(f"{count} {code}" for code, count in measured.streams_ended.items())
        print(
            f"  round {number}: {measured.alone.jobs_per_second:.1f} -> "
            f"{measured.watched.jobs_per_second:.1f} jobs/s, the watchers took "
            f"{watchers_share(measured.watched, apart.cores):.1%} of the cores; they read "
            f"{measured.changes_read} changes from {measured.read_from:.2f} s to "
            f"{measured.read_until:.2f} s of the {measured.watched.seconds:.2f} s phase, "
            f"streams ended by the server: {ended or 'none'}",
            flush=True,
        )
    print("  the median of each:", flush=True)
    for row in (apart.alone, apart.watched):
        cores = ", ".join(
            f"{role} {used / row.seconds:.2f}" for role, used in row.cpu_seconds.items()
        )
        print(
            f"  {row.name:<40}{row.jobs_per_second:>8.1f} jobs/s   CPU cores: {cores}", flush=True
        )
    print(
        f"  the workers lost {apart.loss:.1%} of their jobs/s; the watchers' replica and the "
        f"watchers' client took {apart.watchers_share:.1%} of the {apart.cores} cores",
        flush=True,
    )


def targets(figures: ScaleFigures) -> list[Target]:
    """Issue 11's targets, each PASS or MISS (a part that could not run misses)."""
    queue = {row.name: row for row in figures.queue}
    procrastinate = queue["Procrastinate, PostgreSQL"]
    checks = [
        Target(
            f"queue on PostgreSQL >= {PROCRASTINATE_FACTOR:g}x Procrastinate's jobs/s",
            procrastinate.jobs > 0
            and queue["mediatag queue, PostgreSQL"].jobs_per_second
            >= PROCRASTINATE_FACTOR * procrastinate.jobs_per_second,
        ),
        Target(
            f"queue on SQLite >= {SQLITE_QUEUE_JOBS_PER_SECOND:g} jobs/s",
            queue["mediatag queue, SQLite"].jobs_per_second >= SQLITE_QUEUE_JOBS_PER_SECOND,
        ),
    ]
    for row in figures.pipeline[:2]:
        checks.append(
            Target(
                f"pipeline, {row.name} >= {ONE_REPLICA_JOBS_PER_SECOND:g} jobs/s",
                row.jobs_per_second >= ONE_REPLICA_JOBS_PER_SECOND,
            )
        )
    seed = figures.seed
    checks += [
        Target(
            f"seed, 3 replicas: >= {LIMIT_SHARE:.0%} of the one limit",
            isinstance(seed, SeedFigures) and seed.share_of_limit >= LIMIT_SHARE,
        ),
        Target(
            "seed, 3 replicas: no 1 s with more calls than limit + burst",
            isinstance(seed, SeedFigures)
            and seed.max_calls_in_one_second <= seed.limit_per_second + seed.burst,
        ),
    ]
    delays = figures.delays
    checks.append(
        Target(
            f"watch delay p99 on another replica within {WATCH_DELAY_FACTOR:g}x of the "
            "committing replica's",
            isinstance(delays, list) and delays[0].p99_ms <= WATCH_DELAY_FACTOR * delays[1].p99_ms,
        )
    )
    apart = figures.apart
    checks.append(
        Target(
            "watchers apart: the workers lose no more than the cores the watchers take",
            isinstance(apart, ApartFigures) and apart.loss <= apart.watchers_share,
        )
    )
    return checks


def print_targets(targets: Sequence[Target]) -> None:
    print("\ntargets", flush=True)
    for target in targets:
        print(f"  {'PASS' if target.holds else 'MISS'}  {target.description}", flush=True)
