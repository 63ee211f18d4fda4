"""The queue benchmark's figures and how they are printed (it has no target: it informs)."""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bench.queue_alone import QueueAloneRun


@dataclass(frozen=True)
class Setup:
    """Where and with what the figures were measured."""

    cores: int | None
    platform: str
    python: str
    jobs: int
    workers: int
    submit_batch: int
    image_bytes: int
    embedding_dimensions: int
    synchronous: list[str]
    rounds: int


@dataclass(frozen=True)
class PipelineMeasured:
    """Pipeline rounds: seconds from the first SubmitJobs call to the last COMPLETED, to the
    last SubmitJobs answer; CPU seconds used by role."""

    jobs: int
    seconds: float
    submit_seconds: float
    cpu_seconds: Mapping[str, float]

    @property
    def jobs_per_second(self) -> float:
        return self.jobs / self.seconds

    def __add__(self, other: PipelineMeasured) -> PipelineMeasured:
        return PipelineMeasured(
            self.jobs + other.jobs,
            self.seconds + other.seconds,
            self.submit_seconds + other.submit_seconds,
            {role: used + other.cpu_seconds[role] for role, used in self.cpu_seconds.items()},
        )


@dataclass(frozen=True)
class SettingFigures:
    """Both paths at one SQLite synchronous setting, over all rounds; the ratio is
    pipeline / queue alone."""

    synchronous: str
    jobs: int
    pipeline_seconds: float
    pipeline_jobs_per_second: float
    pipeline_submit_seconds: float
    pipeline_cpu_cores: Mapping[str, float]
    pipeline_rounds_jobs_per_second: list[float]
    alone_seconds: float
    alone_jobs_per_second: float
    alone_submit_seconds: float
    alone_drain_seconds: float
    alone_cpu_cores: float
    alone_rounds_jobs_per_second: list[float]
    pipeline_to_alone: float

    @classmethod
    def of(
        cls,
        synchronous: str,
        pipeline_rounds: Sequence[PipelineMeasured],
        alone_rounds: Sequence[QueueAloneRun],
    ) -> SettingFigures:
        pipeline = functools.reduce(operator.add, pipeline_rounds)
        alone = functools.reduce(operator.add, alone_rounds)
        return cls(
            synchronous=synchronous,
            jobs=pipeline.jobs,
            pipeline_seconds=pipeline.seconds,
            pipeline_jobs_per_second=pipeline.jobs_per_second,
            pipeline_submit_seconds=pipeline.submit_seconds,
            pipeline_cpu_cores={
                role: used / pipeline.seconds for role, used in pipeline.cpu_seconds.items()
            },
            pipeline_rounds_jobs_per_second=[run.jobs_per_second for run in pipeline_rounds],
            alone_seconds=alone.seconds,
            alone_jobs_per_second=alone.jobs_per_second,
            alone_submit_seconds=alone.submit_seconds,
            alone_drain_seconds=alone.drain_seconds,
            alone_cpu_cores=alone.cpu_seconds / alone.seconds,
            alone_rounds_jobs_per_second=[run.jobs_per_second for run in alone_rounds],
            pipeline_to_alone=pipeline.jobs_per_second / alone.jobs_per_second,
        )


@dataclass(frozen=True)
class QueueFigures:
    setup: Setup
    upload_seconds: float
    settings: list[SettingFigures]


def print_setup(setup: Setup) -> None:
    lines = [
        "queue benchmark: jobs/s through the whole pipeline vs through the JobQueue alone",
        f"  machine   {setup.cores} cores, {setup.platform}, python {setup.python}",
        f"  jobs      {setup.jobs}; analyser with no latency (fixed tags, "
        f"{setup.embedding_dimensions}-dim embedding),",
        f"            no rate limit; SQLite (WAL) synchronous {', '.join(setup.synchronous)}",
        "            (the service's default is FULL), new databases for each setting",
        "  pipeline  `mediatag serve ingest` holds the bytes: byte-distinct "
        f"{setup.image_bytes / 1000:.1f} KB JPEGs uploaded",
        "            before timing (its outbox points nowhere: this process submits the jobs);",
        "            the analysis service with the simulated analyser (bench.sim_server), "
        f"{setup.workers} workers;",
        f"            separate processes. SubmitJobs of {setup.submit_batch} jobs, one call at "
        "a time, while one",
        "            WatchStatus stream reads every event; timed from the first SubmitJobs to "
        "the last",
        "            COMPLETED read. Per job: claim, cache lookup, its bytes (ReadMediaContents, "
        "several jobs",
        "            a call) + sha256, analyser, complete with the result; events PENDING, "
        "PROCESSING, COMPLETED",
        "  alone     JobQueue over a new SQLite file in this process, built as the service "
        "builds it;",
        f"            submit in batches of {setup.submit_batch}, then {setup.workers} tasks "
        "claim -> complete until",
        "            none is left; timed from the first submit to the last complete",
        f"  rounds    each path's jobs in {setup.rounds} rounds on the same databases, "
        "alternating which",
        "            path goes first (P A A P ...), so that noise on this machine hits both",
    ]
    print("\n".join(lines), flush=True)


def print_results(figures: QueueFigures) -> None:
    jobs = figures.setup.jobs
    lines = [f"  uploaded {jobs} images to ingest in {figures.upload_seconds:.1f} s (not timed)"]
    for setting in figures.settings:
        cpu = setting.pipeline_cpu_cores
        lines += [
            "",
            f"synchronous={setting.synchronous}, {setting.jobs} jobs per path",
            f"  {'':<18}{'seconds':>9}{'jobs/s':>9}   by round (jobs/s)",
            f"  {'pipeline':<18}{setting.pipeline_seconds:>9.2f}"
            f"{setting.pipeline_jobs_per_second:>9.1f}   "
            f"{_rounds(setting.pipeline_rounds_jobs_per_second)}",
            f"  {'queue alone':<18}{setting.alone_seconds:>9.2f}"
            f"{setting.alone_jobs_per_second:>9.1f}   "
            f"{_rounds(setting.alone_rounds_jobs_per_second)}",
            f"  {'pipeline / alone':<18}{'':>9}{setting.pipeline_to_alone:>8.2f}x",
            f"  pipeline: SubmitJobs took {setting.pipeline_submit_seconds:.2f} s of it; CPU "
            f"cores: analysis {cpu['analysis']:.2f} (event loop {cpu['analysis loop']:.2f}),",
            f"            ingest {cpu['ingest']:.2f}, client {cpu['client']:.2f}",
            f"  alone:    submit {setting.alone_submit_seconds:.2f} s, claim -> complete "
            f"{setting.alone_drain_seconds:.2f} s; CPU cores {setting.alone_cpu_cores:.2f}",
        ]
    if len(figures.settings) > 1:
        base = figures.settings[0]
        lines.append("")
        for other in figures.settings[1:]:
            lines.append(
                f"  {other.synchronous} / {base.synchronous}: pipeline "
                f"{other.pipeline_jobs_per_second / base.pipeline_jobs_per_second:.2f}x, "
                f"queue alone {other.alone_jobs_per_second / base.alone_jobs_per_second:.2f}x"
            )
    print("\n".join(lines), flush=True)


def _rounds(rates: Sequence[float]) -> str:
    return ", ".join(f"{rate:.1f}" for rate in rates)
