"""The fan-out benchmark's figures, its targets, and how both are printed."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from mediatag.analysis.v1 import analysis_pb2

from bench.watchers import Receipts

OURS = "mediatag"
BARE = "bare"
BARE_TIMED = "bare-t"
P99_TARGET = 2.0
MEMORY_TARGET = 1.5
KIB = 1024
MIB = 1024 * 1024
_NS_PER_MS = 1_000_000
_NS_PER_S = 1_000_000_000
# An event loop using this share of a core, or processes using this share of the machine's
# cores, may have limited a run.
_BUSY_CORE = 0.85
_BUSY_MACHINE = 0.85
_WIDTH = 100

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Setup:
    """Where and with what the figures were measured."""

    cores: int | None
    platform: str
    python: str
    grpcio: str
    watchers: int
    channels: int
    workers: int
    rate_limit: str
    max_watchers: int
    jobs: int
    image_pixels: str
    image_bytes: int
    warmup_seconds: float
    window_seconds: float
    temp_dir: str


@dataclass(frozen=True)
class Measured:
    """What one server's run recorded, before any figure is computed."""

    receipts: Receipts
    window_ns: tuple[int, int]
    idle_rss: int
    watched_rss: int
    watchers: int
    # CPU cores each process used during the window, by role.
    cpu_cores: Mapping[str, float]
    ended: Mapping[str, int]
    caught_up: bool


@dataclass(frozen=True)
class ServerFigures:
    """One server's figures; times are commit (or broadcast) to receipt by a watcher."""

    changes_per_second: float
    delivered_per_second: float
    delay_p50_ms: float
    delay_p99_ms: float
    delay_max_ms: float
    # p50 of the changes committed in the window's first and last quarter: a rise means
    # the watchers fall further behind as the run goes on.
    first_quarter_p50_ms: float
    last_quarter_p50_ms: float
    first_watcher_p50_ms: float
    message_bytes: float
    idle_rss_mib: float
    watched_rss_mib: float
    kib_per_idle_watcher: float
    cpu_cores: Mapping[str, float]
    streams_ended: Mapping[str, int]
    caught_up: bool

    @classmethod
    def of(cls, measured: Measured) -> ServerFigures:
        start, end = measured.window_ns
        seconds = (end - start) / _NS_PER_S
        receipts = measured.receipts
        revisions = _array(receipts.revisions)
        committed = _array(receipts.committed_ns)
        received = _array(receipts.received_ns)
        in_window = (committed >= start) & (committed < end)
        if not in_window.any():
            raise RuntimeError("no status change was committed and received in the window")
        delays_ms = (received[in_window] - committed[in_window]) / _NS_PER_MS
        quarter = (end - start) // 4
        first_quarter = committed[in_window] < start + quarter
        last_quarter = committed[in_window] >= end - quarter
        window_revisions = revisions[in_window]
        # The first watcher's delay per change: commit, publish and one send, without the
        # queueing behind the other watchers.
        order = np.lexsort((delays_ms, window_revisions))
        firsts = np.unique(window_revisions[order], return_index=True)[1]
        first_delays_ms = delays_ms[order][firsts]
        delivered = np.count_nonzero((received >= start) & (received < end))
        return cls(
            changes_per_second=len(firsts) / seconds,
            delivered_per_second=delivered / seconds,
            delay_p50_ms=float(np.percentile(delays_ms, 50)),
            delay_p99_ms=float(np.percentile(delays_ms, 99)),
            delay_max_ms=float(delays_ms.max()),
            first_quarter_p50_ms=_p50(delays_ms[first_quarter]),
            last_quarter_p50_ms=_p50(delays_ms[last_quarter]),
            first_watcher_p50_ms=float(np.percentile(first_delays_ms, 50)),
            message_bytes=float(_array(receipts.sizes)[in_window].mean()),
            idle_rss_mib=measured.idle_rss / MIB,
            watched_rss_mib=measured.watched_rss / MIB,
            kib_per_idle_watcher=(measured.watched_rss - measured.idle_rss)
            / measured.watchers
            / KIB,
            cpu_cores=dict(measured.cpu_cores),
            streams_ended=dict(measured.ended),
            caught_up=measured.caught_up,
        )


def jobs_completed_per_second(measured: Measured) -> float:
    """Jobs that reached COMPLETED per second of the window (mediatag's run only)."""
    start, end = measured.window_ns
    receipts = measured.receipts
    committed = _array(receipts.committed_ns)
    completed = (committed >= start) & (committed < end)
    completed &= _array(receipts.statuses) == analysis_pb2.PROCESSING_STATUS_COMPLETED
    return len(np.unique(_array(receipts.revisions)[completed])) / ((end - start) / _NS_PER_S)


def commit_offsets(receipts: Receipts) -> list[float]:
    """Seconds from the first change's event time to each change's, in revision order."""
    revisions, first = np.unique(_array(receipts.revisions), return_index=True)
    if not len(revisions):
        return []
    committed = _array(receipts.committed_ns)[first]
    return [float(ns) / _NS_PER_S for ns in np.maximum.accumulate(committed) - committed[0]]


@dataclass(frozen=True)
class TargetCheck:
    description: str
    ratio: float
    holds: bool


@dataclass(frozen=True)
class FanoutFigures:
    """Both servers; ratios are ours/bare."""

    setup: Setup
    ours: ServerFigures
    bare: ServerFigures
    # The bare server again, sending at the moments mediatag committed (its bursts).
    bare_timed: ServerFigures
    delivered_ratio: float
    p50_ratio: float
    p99_ratio: float
    memory_ratio: float
    p50_ratio_timed: float
    p99_ratio_timed: float
    # mediatag's workers, with the watchers connected and with none.
    jobs_per_second: float
    jobs_per_second_without_watchers: float
    targets: list[TargetCheck]


def fanout_figures(
    setup: Setup,
    ours: Measured,
    bare: Measured,
    bare_timed: Measured,
    *,
    jobs_per_second_without_watchers: float,
) -> FanoutFigures:
    ours_figures, bare_figures = ServerFigures.of(ours), ServerFigures.of(bare)
    timed_figures = ServerFigures.of(bare_timed)
    p99_ratio = ours_figures.delay_p99_ms / bare_figures.delay_p99_ms
    memory_ratio = ours_figures.kib_per_idle_watcher / bare_figures.kib_per_idle_watcher
    return FanoutFigures(
        setup=setup,
        ours=ours_figures,
        bare=bare_figures,
        bare_timed=timed_figures,
        delivered_ratio=ours_figures.delivered_per_second / bare_figures.delivered_per_second,
        p50_ratio=ours_figures.delay_p50_ms / bare_figures.delay_p50_ms,
        p99_ratio=p99_ratio,
        memory_ratio=memory_ratio,
        p50_ratio_timed=ours_figures.delay_p50_ms / timed_figures.delay_p50_ms,
        p99_ratio_timed=ours_figures.delay_p99_ms / timed_figures.delay_p99_ms,
        jobs_per_second=jobs_completed_per_second(ours),
        jobs_per_second_without_watchers=jobs_per_second_without_watchers,
        targets=[
            TargetCheck(
                f"p99 commit-to-watcher delay within {P99_TARGET:g}x of bare",
                p99_ratio,
                p99_ratio <= P99_TARGET,
            ),
            TargetCheck(
                f"memory per idle watcher within {MEMORY_TARGET:g}x of bare",
                memory_ratio,
                memory_ratio <= MEMORY_TARGET,
            ),
        ],
    )


def print_setup(setup: Setup) -> None:
    items = [
        ("machine", f"{setup.cores} cores, {setup.platform}, python {setup.python}, "
         f"grpcio {setup.grpcio}"),
        (OURS, f"`mediatag serve analysis --workers {setup.workers} --rate-limit "
         f"{setup.rate_limit} --max-watchers {setup.max_watchers}` and `mediatag serve ingest` "
         "(which watches too): two subprocesses, SQLite in a temp dir, other settings default "
         "(MEDIATAG_* unset)"),
        ("jobs", f"{setup.jobs} JPEGs, {setup.image_pixels}, {setup.image_bytes / 1000:.0f} KB, "
         "bytes unique (no cache reuse), queued while paused; then the queue is resumed and the "
         "workers run flat out, no rate limit"),
        (BARE, "`python -m bench.bare_broadcast`: one asyncio.Queue per stream, replaying "
         "mediatag's own change messages, re-stamped, evenly spaced at the rate mediatag "
         "committed them (the baseline of the targets)"),
        (BARE_TIMED, "the same bare server sending at the moments mediatag committed its "
         "changes, bursts and gaps alike: how much of the delay is the timing of the changes"),
        ("watchers", f"{setup.watchers} streams (all items, from now) over {setup.channels} "
         "connections, all in this process"),
        ("memory", "server RSS with the streams open and idle minus RSS with none, after a "
         "warm-up"),
        ("delay", "receipt here minus the change's event_time, same clock; mediatag stamps it "
         "as the transaction starts, so its figure includes the commit; bare as it broadcasts"),
        ("window", f"{setup.warmup_seconds:g} s of events, then {setup.window_seconds:g} s "
         "measured; changes committed in it are followed until every watcher has read them"),
    ]  # fmt: skip
    lines = [
        f"fan-out benchmark: WatchStatus to {setup.watchers} watchers, mediatag's analysis "
        "service vs a bare grpc.aio broadcaster"
    ]
    for label, text in items:
        lines += _wrap(label, text)
    print("\n".join(lines), flush=True)


def print_results(figures: FanoutFigures) -> None:
    header = (
        f"  {'':<10}{'changes/s':>10}{'delivered/s':>13}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'KiB/idle watcher':>18}"
    )
    lines = [
        "",
        header,
        _server_row(OURS, figures.ours),
        _server_row(BARE, figures.bare),
        _server_row(BARE_TIMED, figures.bare_timed),
        f"  {'ours/bare':<10}{'':>10}{figures.delivered_ratio:>12.2f}x"
        f"{figures.p50_ratio:>9.2f}x{figures.p99_ratio:>9.2f}x{figures.memory_ratio:>17.2f}x",
        f"  {'ours/' + BARE_TIMED:<10}{'':>22}"
        f"{figures.p50_ratio_timed:>9.2f}x{figures.p99_ratio_timed:>9.2f}x",
        "",
        *_wrap(
            OURS,
            f"workers completed {figures.jobs_per_second:.1f} jobs/s with the watchers, "
            f"{figures.jobs_per_second_without_watchers:.1f} jobs/s with none but ingest's "
            f"({figures.setup.warmup_seconds:g} s, before they connected)",
        ),
        *_details(OURS, figures.ours),
        *_details(BARE, figures.bare),
        *_details(BARE_TIMED, figures.bare_timed),
        *_bottlenecks(figures),
        "",
        "targets",
    ]
    lines += [
        f"  {'PASS' if check.holds else 'MISS'}  {check.description}: {check.ratio:.2f}x"
        for check in figures.targets
    ]
    print("\n".join(lines), flush=True)


def _server_row(name: str, figures: ServerFigures) -> str:
    return (
        f"  {name:<10}{figures.changes_per_second:>10.1f}{figures.delivered_per_second:>13.0f}"
        f"{figures.delay_p50_ms:>10.1f}{figures.delay_p99_ms:>10.1f}"
        f"{figures.kib_per_idle_watcher:>18.1f}"
    )


def _details(name: str, figures: ServerFigures) -> list[str]:
    cpu = ", ".join(f"{role} {cores:.2f}" for role, cores in figures.cpu_cores.items())
    texts = [
        f"p50 {figures.first_quarter_p50_ms:.0f} ms in the window's first quarter, "
        f"{figures.last_quarter_p50_ms:.0f} ms in its last; max {figures.delay_max_ms:.0f} ms; "
        f"first watcher's p50 {figures.first_watcher_p50_ms:.1f} ms; "
        f"{figures.message_bytes:.0f} B per message",
        f"RSS {figures.idle_rss_mib:.1f} MiB idle, {figures.watched_rss_mib:.1f} MiB with the "
        f"streams; CPU cores used in the window: {cpu}",
    ]
    if figures.streams_ended:
        ended = ", ".join(f"{count} {code}" for code, count in figures.streams_ended.items())
        texts.append(f"streams ended early: {ended}")
    if not figures.caught_up:
        texts.append("NOT every watcher caught up before the drain timeout")
    return [line for text in texts for line in _wrap(name, text)]


def _bottlenecks(figures: FanoutFigures) -> list[str]:
    """Say so when an event loop, or the whole machine, was busy enough to limit a run."""
    notes = []
    cores = figures.setup.cores
    for name, server in (
        (OURS, figures.ours),
        (BARE, figures.bare),
        (BARE_TIMED, figures.bare_timed),
    ):
        loops = {role: used for role, used in server.cpu_cores.items() if role.endswith(" loop")}
        notes += [
            f"in the {name} run the {role.removesuffix(' loop')} process's main thread (its "
            f"event loop) used {used:.2f} of a core: it may have limited the figures"
            for role, used in loops.items()
            if used >= _BUSY_CORE
        ]
        total = sum(used for role, used in server.cpu_cores.items() if role not in loops)
        if cores and total >= _BUSY_MACHINE * cores:
            notes.append(
                f"in the {name} run the processes used {total:.2f} of the {cores} cores: "
                "the machine was nearly saturated"
            )
    return [line for note in notes for line in _wrap("note", note)]


def _wrap(label: str, text: str) -> list[str]:
    """``text`` under ``label``, wrapped to the report's width."""
    return textwrap.wrap(text, _WIDTH, initial_indent=f"  {label:<9} ", subsequent_indent=" " * 12)


def _p50(values: npt.NDArray[np.float64]) -> float:
    return float(np.percentile(values, 50)) if len(values) else float("nan")


def _array(values: object) -> IntArray:
    return np.asarray(values, dtype=np.int64)
