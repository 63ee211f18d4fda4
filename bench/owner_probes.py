"""Can an owner-restricted token tell another owner's real ids from ids that do not exist?

Both services run as subprocesses with a tokens file. An admin uploads images of one owner;
a token restricted to another owner then probes ``GetJob`` and ``GetMedia`` with those ids and
as many random ones, each ``--probe-rounds`` times, in a shuffled order (the seed is printed;
``--probe-seed`` replays it). Both kinds of id are refused alike; the attacker's best guess
takes the ids with the slowest median answer as the real ones. The figures are how many ids
that guess classifies correctly (half of them by chance) and the difference of the medians.
Issue 12 found 39 of 40 ids on ``GetJob`` and 35 on ``GetMedia`` this way, 200-400 µs apart.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from mediatag.analysis.v1 import analysis_pb2, analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from bench.benchmark import Benchmark, Figures, positive
from bench.fanout import count_of, until_status
from bench.jpeg import photo_like_jpeg
from bench.processes import free_ports, running_server
from mediatag_common.grpc_server import open_channel

_READY_TIMEOUT = 60.0
_STOP_TIMEOUT = 20.0
_CALL_TIMEOUT = 10.0
_ENV_PREFIX = "MEDIATAG_"
_TOKENS = {
    "admin": ("ops", "bench-admin-token-0123456789", '["admin"]', None),
    "service": ("services", "bench-service-token-0123456789", '["service"]', None),
    "prober": ("prober", "bench-prober-token-0123456789", '["uploader"]', "mine"),
}
# The attacker's best guess is right for this share of ids or fewer: chance, give or take
# what 40 coin tosses spread to (26 of 40 is the 95th percentile of chance).
_TARGET_ACCURACY = 0.7


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--probe-ids", type=positive, default=20, metavar="N",
        help="real ids of another owner, and as many unknown ones (default 20)",
    )  # fmt: skip
    group.add_argument(
        "--probe-rounds", type=positive, default=30, metavar="N",
        help="probes of each id (default 30)",
    )  # fmt: skip
    group.add_argument(
        "--probe-seed", type=int, default=None, metavar="N",
        help="seed of the probing order (default: a new one, printed)",
    )  # fmt: skip


def _tokens_file(path: Path) -> Path:
    entries = []
    for name, token, roles, owner in _TOKENS.values():
        owners = f'\nowners = ["{owner}"]' if owner else ""
        entries.append(f'[[tokens]]\nname = "{name}"\ntoken = "{token}"\nroles = {roles}{owners}\n')
    path.write_text("\n".join(entries))
    return path


def _serve(work_dir: Path, service: str, ports: dict[str, int]) -> Any:
    mediatag = Path(sys.executable).parent / "mediatag"
    argv = [
        str(mediatag), "serve", service, "--data-dir", str(work_dir),
        "--analysis-port", str(ports["analysis"]), "--ingest-port", str(ports["ingest"]),
        "--tokens-file", str(work_dir / "tokens.toml"), "--log-level", "WARNING",
        f"--{service}-metrics-port", "off",
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if not key.startswith(_ENV_PREFIX)}
    env["MEDIATAG_SERVICE_TOKEN"] = _TOKENS["service"][1]
    return running_server(
        f"mediatag {service}", argv, address=f"127.0.0.1:{ports[service]}",
        log_path=work_dir / f"{service}.log", ready_timeout=_READY_TIMEOUT,
        stop_timeout=_STOP_TIMEOUT, env=env,
    )  # fmt: skip


async def _probe(call: Callable[[], Awaitable[Any]]) -> int:
    """Nanoseconds to the refusal of one call."""
    started = time.perf_counter_ns()
    try:
        await call()
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.PERMISSION_DENIED:
            raise
    else:
        raise AssertionError("a probe of another owner's id was answered")
    return time.perf_counter_ns() - started


def _classified(real: list[float], unknown: list[float]) -> int:
    """Ids the attacker's guess gets right: the slowest half taken for the real ones."""
    ranked = sorted([(m, True) for m in real] + [(m, False) for m in unknown], reverse=True)
    guessed_real = {index for index, _ in enumerate(ranked[: len(real)])}
    return sum((index in guessed_real) == is_real for index, (_, is_real) in enumerate(ranked))


async def run(args: argparse.Namespace) -> Figures:
    seed = args.probe_seed if args.probe_seed is not None else random.randrange(2**32)
    count, rounds = args.probe_ids, args.probe_rounds
    print(f"owner probes: {count} real and {count} unknown ids, {rounds} probes each, seed {seed}")
    analysis_port, ingest_port = free_ports(2)
    ports = {"analysis": analysis_port, "ingest": ingest_port}
    with tempfile.TemporaryDirectory(prefix="mediatag-bench-probes-") as temp:
        work_dir = Path(temp)
        _tokens_file(work_dir / "tokens.toml")
        async with _serve(work_dir, "analysis", ports), _serve(work_dir, "ingest", ports):
            admin = open_channel(f"127.0.0.1:{ingest_port}", token=_TOKENS["admin"][1])
            queue = open_channel(f"127.0.0.1:{analysis_port}", token=_TOKENS["admin"][1])
            prober_ingest = open_channel(f"127.0.0.1:{ingest_port}", token=_TOKENS["prober"][1])
            prober_analysis = open_channel(f"127.0.0.1:{analysis_port}", token=_TOKENS["prober"][1])
            try:
                upload = await ingest_pb2_grpc.IngestServiceStub(admin).UploadMedia(
                    ingest_pb2.UploadMediaRequest(
                        owner_id="theirs",
                        files=[
                            ingest_pb2.MediaFile(
                                filename=f"{n}.jpg",
                                content=photo_like_jpeg(
                                    n, target_bytes=20_000, width=256, height=192
                                ).content,
                            )
                            for n in range(count)
                        ],
                    ),
                    timeout=_CALL_TIMEOUT,
                )
                real = [media.id for media in upload.media]
                # Every job delivered and analysed: GetJob finds each real id.
                await until_status(
                    analysis_pb2_grpc.AnalysisServiceStub(queue),
                    lambda status: (
                        count_of(status, analysis_pb2.PROCESSING_STATUS_COMPLETED) >= count
                    ),
                )
                shuffler = random.Random(seed)
                unknown = [
                    str(uuid.UUID(int=shuffler.getrandbits(128), version=4)) for _ in range(count)
                ]
                jobs = analysis_pb2_grpc.AnalysisServiceStub(prober_analysis)
                media = ingest_pb2_grpc.IngestServiceStub(prober_ingest)
                calls: dict[str, Callable[[str], Callable[[], Awaitable[Any]]]] = {
                    "GetJob": lambda media_id: (
                        lambda: jobs.GetJob(
                            analysis_pb2.GetJobRequest(media_id=media_id), timeout=_CALL_TIMEOUT
                        )
                    ),
                    "GetMedia": lambda media_id: (
                        lambda: media.GetMedia(
                            ingest_pb2.GetMediaRequest(media_id=media_id), timeout=_CALL_TIMEOUT
                        )
                    ),
                }
                figures: dict[str, object] = {"seed": seed, "ids": 2 * count, "rounds": rounds}
                for method, call in calls.items():
                    times: dict[str, list[int]] = {media_id: [] for media_id in real + unknown}
                    order = [media_id for media_id in times for _ in range(rounds)]
                    shuffler.shuffle(order)
                    for media_id in order[:20]:  # warm-up, not counted
                        await _probe(call(media_id))
                    for media_id in order:
                        times[media_id].append(await _probe(call(media_id)))
                    medians = {i: statistics.median(t) / 1000 for i, t in times.items()}
                    real_medians = [medians[i] for i in real]
                    unknown_medians = [medians[i] for i in unknown]
                    right = _classified(real_medians, unknown_medians)
                    gap = statistics.median(real_medians) - statistics.median(unknown_medians)
                    verdict = "PASS" if right <= _TARGET_ACCURACY * 2 * count else "MISS"
                    print(
                        f"  {method}: {right} of {2 * count} ids classified by median time "
                        f"(target <= {_TARGET_ACCURACY:.0%}) {verdict}; medians "
                        f"{statistics.median(real_medians):.0f} µs real, "
                        f"{statistics.median(unknown_medians):.0f} µs unknown ({gap:+.0f} µs)"
                    )
                    figures[method] = {
                        "classified": right,
                        "median_real_us": statistics.median(real_medians),
                        "median_unknown_us": statistics.median(unknown_medians),
                    }
                return figures
            finally:
                for channel in (admin, queue, prober_ingest, prober_analysis):
                    await channel.close()


BENCHMARK = Benchmark(
    name="owner-probes",
    summary="whether a restricted token tells another owner's ids from unknown ones by time",
    add_arguments=add_arguments,
    run=run,
)
