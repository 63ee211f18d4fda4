"""`mediatag watch --json` as a subprocess: it reconnects by itself and misses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.ingest.v1 import ingest_pb2 as ipb

from analysis_service.config import AnalysisConfig, RateLimitConfig, WatchConfig
from analysis_service.errors import PermanentAnalyzerError
from mediatag_common.errors import error_info
from tests.conftest import PATIENCE, Cluster, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.media_samples import mp4_bytes
from tests.processes import MEDIATAG
from tests.test_pipeline import image_files, upload, wait_terminal

# A CLI that hangs can be made to show where (see ``interrupt``).
CLI_ENV = {**os.environ, "PYTHONFAULTHANDLER": "1"}
# Runs argv[1:] with SIGINT at its default. A test run with SIGINT ignored (a background job of
# a non-interactive shell, as CI may start it) passes that on to its children, and a Python
# started so never turns SIGINT into KeyboardInterrupt: the Ctrl-C sent here would be lost.
_AS_FROM_A_TERMINAL = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def mediatag_command(*args: str) -> tuple[str, ...]:
    """The command line of ``mediatag ARGS`` that Ctrl-C (SIGINT) stops, as in a terminal."""
    return (sys.executable, "-c", _AS_FROM_A_TERMINAL, MEDIATAG, *args)


def analysis_config(**watch: Any) -> AnalysisConfig:
    return AnalysisConfig(
        embedding_dimensions=64,
        rate_limits={"local": RateLimitConfig(50, 1)},
        watch=WatchConfig(**watch),
    )


def addresses(cluster: Cluster) -> tuple[str, ...]:
    """The client flags that point ``mediatag`` at the cluster's services."""
    return (
        "--ingest", f"127.0.0.1:{cluster.ingest_port}",
        "--analysis", f"127.0.0.1:{cluster.analysis_port}",
    )  # fmt: skip


@contextlib.asynccontextmanager
async def cli_watch(cluster: Cluster, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``mediatag watch --json ARGS`` against the cluster; interrupted on exit like Ctrl-C."""
    process = await asyncio.create_subprocess_exec(
        *mediatag_command("watch", "--json", *addresses(cluster), *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=CLI_ENV,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            await interrupt(process)


async def interrupt(process: asyncio.subprocess.Process) -> int:
    """Ctrl-C, then the exit status. What the CLI still prints is read meanwhile (its stderr
    is left to the test): blocked on a full pipe, it could not flush and exit.

    A CLI still running after PATIENCE is sent SIGABRT: started with ``PYTHONFAULTHANDLER``
    (see :data:`CLI_ENV`), it writes every thread's stack to its stderr first."""
    assert process.stdout is not None
    process.send_signal(signal.SIGINT)
    try:
        _, status = await asyncio.wait_for(
            asyncio.gather(process.stdout.read(), process.wait()), PATIENCE
        )
    except TimeoutError:
        state = _process_state(process.pid)
        stderr = b"(in the test's captured stderr)"
        if state not in ("gone", "Z"):
            process.send_signal(signal.SIGABRT)
            # Only for the stacks to reach stderr before the test's output is collected.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 30)
                if process.stderr is not None:
                    stderr = await asyncio.wait_for(process.stderr.read(), 30)
        raise AssertionError(
            f"mediatag not ended {PATIENCE} s after SIGINT (process state {state}); "
            f"its stderr: {stderr.decode(errors='replace')}"
        ) from None
    return status


def _process_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc (R, S, Z...), or "gone"."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[0]


async def read_events(
    process: asyncio.subprocess.Process, enough: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """JSON lines from the CLI until ``enough`` of them arrived (or the CLI ended)."""
    assert process.stdout is not None
    events: list[dict[str, Any]] = []
    while not enough(events):
        line = await asyncio.wait_for(process.stdout.readline(), PATIENCE)
        if not line:
            break
        events.append(json.loads(line))
    return events


COMPLETED = "PROCESSING_STATUS_COMPLETED"


def changes(events: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    return [
        (int(e["revision"]), e["change"]["mediaId"], e["change"]["status"])
        for e in events
        if "change" in e
    ]


async def test_cli_watch_resumes_across_a_restart_of_analysis_and_misses_nothing(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(dimensions=64), analysis_config=analysis_config()
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    warm_up = await upload(cluster, image_files(1, first_seed=70))
    await wait_terminal(cluster, [warm_up.media[0].id])
    start = (await cluster.analysis.GetQueueStatus(apb.GetQueueStatusRequest())).current_revision

    async with cli_watch(cluster, "--since", str(start)) as process:
        before = await upload(cluster, image_files(3, first_seed=71))
        before_ids = {m.id for m in before.media}

        def before_finished(seen: list[dict[str, Any]]) -> bool:
            done = {mid for _, mid, status in changes(seen) if status == COMPLETED}
            return before_ids <= done

        # The CLI is connected and streaming when the service goes away.
        events = await read_events(process, before_finished)
        await cluster.stop_analysis()
        await cluster.start_analysis()
        after = await upload(cluster, image_files(3, first_seed=74))
        ids = [m.id for m in [*before.media, *after.media]]
        await wait_terminal(cluster, ids)

        reference = [
            r
            async for r in cluster.analysis.WatchStatus(
                apb.WatchStatusRequest(start_revision=start, media_ids=ids, until_terminal=True)
            )
        ]
        expected = [
            (r.revision, r.change.media_id, apb.ProcessingStatus.Name(r.change.status))
            for r in reference
            if r.HasField("change")
        ]
        last = expected[-1][0]
        events += await read_events(
            process, lambda seen: bool(seen) and int(seen[-1].get("revision", 0)) >= last
        )

    assert changes(events) == expected
    assert process.stderr is not None
    notices = (await process.stderr.read()).decode()
    assert "reconnecting" in notices


async def test_cli_watch_starts_over_from_the_current_state_when_its_revision_is_compacted(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(dimensions=64),
        analysis_config=analysis_config(retention_events=3, compaction_interval=0.1),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    response = await upload(cluster, image_files(4, first_seed=80))
    ids = [m.id for m in response.media]
    await wait_terminal(cluster, ids)

    async def revision_one_compacted() -> bool:
        try:
            async for _ in cluster.analysis.WatchStatus(
                apb.WatchStatusRequest(start_revision=1, media_ids=ids, until_terminal=True),
                timeout=PATIENCE,
            ):
                pass
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            return info is not None and info.reason == "REVISION_COMPACTED"
        return False

    await wait_until(revision_one_compacted)

    async with cli_watch(cluster, "--since", "1", "--until-terminal", *ids) as process:
        events = await read_events(process, lambda _: False)  # until the CLI ends by itself
        assert await asyncio.wait_for(process.wait(), PATIENCE) == 0

    current = {e["change"]["mediaId"]: e["change"] for e in events if "change" in e}
    assert set(current) == set(ids)
    assert all(c["initialState"] for c in current.values())
    assert {c["status"] for c in current.values()} == {"PROCESSING_STATUS_COMPLETED"}
    assert process.stderr is not None
    assert "starting over from the current state" in (await process.stderr.read()).decode()


async def watch_to_the_end(cluster: Cluster, *args: str) -> tuple[int, str, str]:
    """``mediatag watch ARGS`` against the cluster, until it ends by itself: its exit status,
    stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *mediatag_command("watch", *addresses(cluster), *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=CLI_ENV,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), PATIENCE)
    except TimeoutError:
        await interrupt(process)
        raise AssertionError(f"mediatag watch {' '.join(args)} did not end by itself") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_watch_until_terminal_counts_what_was_terminal_before_it_began(
    make_cluster: Callable[..., Cluster],
) -> None:
    gate = asyncio.Event()
    gate.set()
    failing, held = image_files(2, first_seed=60)
    analyzer = ScriptedAnalyzer(
        dimensions=64,
        gate=gate,
        fail_always={
            hashlib.sha256(failing.content).hexdigest(): PermanentAnalyzerError(
                "broken", reason="BROKEN"
            )
        },
    )
    cluster = make_cluster(analyzer=analyzer, analysis_config=analysis_config())
    await cluster.start_analysis()
    await cluster.start_ingest()
    video = ipb.MediaFile(filename="clip.mp4", content_type="video/mp4", content=mp4_bytes())
    first = await upload(cluster, [failing, video])
    failed_id, video_id = (m.id for m in first.media)
    await wait_terminal(cluster, [failed_id])

    # Failed before the watch began: exit 1, and nothing shown that was not asked for.
    assert await watch_to_the_end(cluster, "--until-terminal", failed_id) == (1, "", "")
    # A video is never analysed: it counts as done at once.
    assert await watch_to_the_end(cluster, "--until-terminal", video_id) == (0, "", "")

    # One item failed before the watch, one finishes during it (or just before).
    gate.clear()
    held_id = (await upload(cluster, [held])).media[0].id
    async with cli_watch(cluster, "--until-terminal", failed_id, held_id, video_id) as process:
        gate.set()
        events = await read_events(process, lambda _: False)  # until the CLI ends by itself
        assert await asyncio.wait_for(process.wait(), PATIENCE) == 1
    assert {media_id for _, media_id, _ in changes(events)} <= {held_id}
    assert not any(e["change"].get("initialState") for e in events if "change" in e)


async def test_cli_watch_until_terminal_refuses_an_id_ingest_does_not_know(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(dimensions=64), analysis_config=analysis_config()
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    known = (await upload(cluster, image_files(1, first_seed=66))).media[0].id
    await wait_terminal(cluster, [known])

    status, out, err = await watch_to_the_end(cluster, "--until-terminal", known, "no-such-id")
    assert (status, out) == (1, "")
    assert "error: no media with id no-such-id at the ingest service" in err
    assert known not in err


async def test_cli_queue_watch_prints_a_fresh_status_every_interval(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(dimensions=64), analysis_config=analysis_config()
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    process = await asyncio.create_subprocess_exec(
        *mediatag_command(
            "queue", "--watch", "0.2", "--json", "--analysis", f"127.0.0.1:{cluster.analysis_port}"
        ),
        stdout=asyncio.subprocess.PIPE,
        env=CLI_ENV,
    )
    try:
        first = await read_events(process, lambda seen: len(seen) == 1)
        response = await upload(cluster, image_files(2, first_seed=90))
        await wait_terminal(cluster, [m.id for m in response.media])

        def shows_both_completed(seen: list[dict[str, Any]]) -> bool:
            if not seen:
                return False
            counts = {c["status"]: int(c["count"]) for c in seen[-1]["counts"]}
            return counts.get(COMPLETED, 0) == 2

        later = await read_events(process, shows_both_completed)
    finally:
        # The pipe may be full: nothing was read while the items were analysed.
        await interrupt(process)
    assert int(first[0]["currentRevision"]) < int(later[-1]["currentRevision"])
    assert shows_both_completed(later)
