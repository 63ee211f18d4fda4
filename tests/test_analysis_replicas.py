"""Two analysis replicas on one PostgreSQL, in this process (issue 11): a watcher on either
sees every change of the cluster in the same order, and a pause holds for both. The
multi-process test with SIGKILLs is tests/test_replicas.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import psycopg
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.analysis.v1 import analysis_pb2_grpc

from analysis_service.config import AnalysisConfig, RateLimitConfig
from analysis_service.domain import workers as workers_module
from analysis_service.server import create_server
from analysis_service.storage.tailer import TAILER_APPLICATION
from mediatag_common.database import libpq_conninfo
from tests.conftest import PATIENCE, Cluster, free_port, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.test_pipeline import image_files, upload
from tests.test_watch import changes


async def test_a_watcher_on_either_replica_sees_the_same_changes_and_a_pause_holds_for_both(
    postgres_url: str, make_cluster: Callable[..., Cluster]
) -> None:
    # postgres_url first: the database outlives the servers the cluster stops.
    analyzer = ScriptedAnalyzer(dimensions=64)
    cluster = make_cluster(
        analyzer=analyzer,
        analysis_database_url=postgres_url,
        analysis_config=AnalysisConfig(
            embedding_dimensions=64, rate_limits={"local": RateLimitConfig(50, 5)}
        ),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    assert cluster.analysis_config is not None
    second_port = free_port()
    second, _ = await create_server(
        replace(cluster.analysis_config, port=second_port), analyzer=analyzer
    )
    await second.start()
    try:
        other = analysis_pb2_grpc.AnalysisServiceStub(cluster.channel(second_port))
        response = await upload(cluster, image_files(6, first_seed=40))
        ids = [m.id for m in response.media]

        await wait_listed(other, ids)
        request = apb.WatchStatusRequest(start_revision=1, media_ids=ids, until_terminal=True)
        # Started once the uploads are in: each catches up from the log, then goes live.
        on_first = [r async for r in cluster.analysis.WatchStatus(request)]
        on_second = [r async for r in other.WatchStatus(request)]

        seen = changes(on_first)
        assert seen == changes(on_second)
        assert sorted({media_id for _, media_id, _ in seen}) == sorted(ids)
        revisions = [revision for revision, _, _ in seen]
        assert revisions == sorted(set(revisions))
        terminal = [m for _, m, s in seen if s == apb.PROCESSING_STATUS_COMPLETED]
        assert sorted(terminal) == sorted(ids)

        # Paused through one replica, the other reports it and claims nothing new.
        await other.PauseQueue(apb.PauseQueueRequest())
        assert (await cluster.analysis.GetQueueStatus(apb.GetQueueStatusRequest())).paused
        paused_upload = await upload(cluster, image_files(1, first_seed=90))
        held_id = paused_upload.media[0].id

        await wait_listed(other, [held_id])
        held = (await other.GetJob(apb.GetJobRequest(media_id=held_id))).job
        assert held.status == apb.PROCESSING_STATUS_PENDING
        await cluster.analysis.ResumeQueue(apb.ResumeQueueRequest())
        done = [
            r
            async for r in other.WatchStatus(
                apb.WatchStatusRequest(
                    media_ids=[held_id], send_initial_state=True, until_terminal=True
                )
            )
        ]
        assert done[-1].change.status == apb.PROCESSING_STATUS_COMPLETED
    finally:
        await second.stop(1.0)


async def test_a_replica_whose_listening_connection_was_dropped_listens_again(
    postgres_url: str, make_cluster: Callable[..., Cluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Idle workers look for work only when woken: the resume on the other replica must
    # reach them through the tailer listening again.
    monkeypatch.setattr(workers_module, "IDLE_POLL", PATIENCE * 10)
    analyzer = ScriptedAnalyzer(dimensions=64)
    cluster = make_cluster(
        analyzer=analyzer,
        analysis_database_url=postgres_url,
        analysis_config=AnalysisConfig(embedding_dimensions=64),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    assert cluster.analysis_config is not None
    # Without workers: every change it streams was committed by the other replica, and
    # reaches it through its tailer alone.
    watching_port = free_port()
    watching, _ = await create_server(
        replace(cluster.analysis_config, port=watching_port, workers=0), analyzer=analyzer
    )
    await watching.start()
    try:

        async def both_listening() -> bool:
            return len(listening_backends(postgres_url)) == 2  # one tailer per replica

        await wait_until(both_listening)
        dropped = listening_backends(postgres_url)
        terminate(postgres_url, dropped)

        async def listening_again() -> bool:
            now = listening_backends(postgres_url)
            return len(now) == 2 and not now & dropped

        await wait_until(listening_again)
        # The jobs held PENDING until the watch is live, so that their changes come to it
        # through the tailer listening again; resumed on the replica without workers.
        stub = analysis_pb2_grpc.AnalysisServiceStub(cluster.channel(watching_port))
        await stub.PauseQueue(apb.PauseQueueRequest())
        response = await upload(cluster, image_files(2, first_seed=70))
        ids = [m.id for m in response.media]

        await wait_listed(stub, ids)
        watch = stub.WatchStatus(
            apb.WatchStatusRequest(media_ids=ids, send_initial_state=True, until_terminal=True),
            timeout=PATIENCE,
        )
        initial = []
        async for item in watch:
            if item.bookmark.initial_state_end:
                break
            initial.append(item)
        assert {r.change.status for r in initial} == {apb.PROCESSING_STATUS_PENDING}
        await stub.ResumeQueue(apb.ResumeQueueRequest())
        seen = changes([r async for r in watch])
        completed = [m for _, m, s in seen if s == apb.PROCESSING_STATUS_COMPLETED]
        assert sorted(completed) == sorted(ids)
    finally:
        await watching.stop(1.0)


async def wait_listed(stub: analysis_pb2_grpc.AnalysisServiceAsyncStub, ids: list[str]) -> None:
    """Wait until the replica of ``stub`` lists the jobs ``ids`` (the outbox delivered them)."""

    async def listed() -> bool:
        jobs = await stub.ListJobs(apb.ListJobsRequest())
        return set(ids) <= {job.media_id for job in jobs.jobs}

    await wait_until(listed)


def listening_backends(url: str) -> set[int]:
    """The server processes of this database's tailers, once each has said LISTEN."""
    with psycopg.connect(libpq_conninfo(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = %s AND query LIKE 'LISTEN %%'",
            (TAILER_APPLICATION,),
        ).fetchall()
    return {pid for (pid,) in rows}


def terminate(url: str, pids: set[int]) -> None:
    with psycopg.connect(libpq_conninfo(url), autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
