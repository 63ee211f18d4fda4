"""GetQueueStatus reports every analysis replica on the queue's database: heartbeats (on
SQLite and PostgreSQL), gone and pruned rows, and what one server and the CLI show."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

import pytest
import sqlalchemy as sa
from mediatag.analysis.v1 import analysis_pb2 as apb

from analysis_service.config import AnalysisConfig, RateLimitConfig
from analysis_service.domain.replicas import GONE_AFTER, PRUNE_AFTER, Heartbeat, Replicas
from analysis_service.storage.replicas import DatabaseReplicas
from analysis_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from mediatag_cli.main import run_client
from mediatag_common.database import Database
from tests.conftest import Cluster, DatabaseUrls, wait_until
from tests.test_pipeline import image_files, upload, wait_terminal


async def _age(db: Database, replica_id: str, seconds: float) -> None:
    """Make a replica's last heartbeat ``seconds`` older (as if it had stopped beating)."""
    await db.write(
        lambda conn: conn.execute(
            sa.text("UPDATE replicas SET last_seen = last_seen - :s WHERE replica_id = :id"),
            {"s": seconds, "id": replica_id},
        )
    )


async def test_replicas_see_each_other_and_a_silent_one_goes(databases: DatabaseUrls) -> None:
    url = databases.new("replicas")
    first_db, second_db = Database(url), Database(url)
    await first_db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    busy = {"first": 2, "second": 0}
    first = Replicas(
        DatabaseReplicas(first_db),
        workers_total=4,
        workers_busy=lambda: busy["first"],
        finished_last_minute=lambda: (10, 25.0),
    )
    second = Replicas(
        DatabaseReplicas(second_db),
        workers_total=3,
        workers_busy=lambda: busy["second"],
        finished_last_minute=lambda: (0, 0.0),
    )
    first.start()
    second.start()
    try:

        async def both_listed() -> bool:
            # Each lists itself at once: only the other's row shows that both have beaten.
            both = {first.replica_id, second.replica_id}
            views = [{r.replica_id for r in await each.cluster()} for each in (first, second)]
            return views == [both, both]

        await wait_until(both_listed)
        seen = {r.replica_id: r for r in await second.cluster()}
        assert (seen[first.replica_id].workers_total, seen[first.replica_id].pid) == (
            4,
            os.getpid(),
        )
        assert seen[first.replica_id].workers_busy == 2
        # What its workers finished in the last minute, for the cluster's throughput.
        assert (
            seen[first.replica_id].finished_last_minute,
            seen[first.replica_id].busy_seconds_last_minute,
        ) == (10, 25.0)
        assert all(r.live for r in seen.values())
        # The answering replica's own figures are those of this moment.
        busy["second"] = 3
        (own,) = [r for r in await second.cluster() if r.replica_id == second.replica_id]
        assert own.workers_busy == 3

        # A clean stop removes the row at once.
        await second.stop()
        assert [r.replica_id for r in await first.cluster()] == [first.replica_id]

        # A replica killed after a heartbeat: its row stays, shown as gone, then pruned.
        killed = Heartbeat("killed", "elsewhere", 7, workers_total=5, workers_busy=5)
        await DatabaseReplicas(second_db).beat(killed, PRUNE_AFTER)
        await _age(first_db, "killed", GONE_AFTER + 1)
        status = {r.replica_id: r.live for r in await first.cluster()}
        assert status == {first.replica_id: True, "killed": False}
        await _age(first_db, "killed", PRUNE_AFTER)
        await wait_until(lambda: _listed(first, "killed", listed=False))
    finally:
        await first.stop()
        await first_db.close()
        await second_db.close()


async def _listed(replicas: Replicas, replica_id: str, *, listed: bool = True) -> bool:
    return (replica_id in {r.replica_id for r in await replicas.cluster()}) == listed


async def test_one_server_reports_itself_and_the_cli_shows_it(
    make_cluster: Callable[..., Cluster], capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = make_cluster(
        analysis_config=AnalysisConfig(workers=3, rate_limits={"local": RateLimitConfig(50, 1)})
    )
    await cluster.start_analysis()
    status = await cluster.analysis.GetQueueStatus(apb.GetQueueStatusRequest())
    (replica,) = status.replicas
    assert replica.replica_id == status.replica_id
    assert (replica.pid, replica.workers_total, replica.state) == (
        os.getpid(),
        3,
        apb.REPLICA_STATE_LIVE,
    )
    assert status.workers_total == 3
    address = f"127.0.0.1:{cluster.analysis_port}"
    assert await run_client(["queue", "--analysis", address]) == 0
    shown = capsys.readouterr().out
    assert "replicas:" in shown
    assert f"{status.replica_id}" in shown
    assert "0 busy of 3" in shown
    assert "live (answered)" in shown


async def test_two_servers_on_one_postgresql_list_each_other(
    make_cluster: Callable[..., Cluster], postgres_url: str
) -> None:
    config = AnalysisConfig(
        workers=2, database_url=postgres_url, rate_limits={"local": RateLimitConfig(50, 1)}
    )
    first, second = make_cluster(analysis_config=config), make_cluster(analysis_config=config)
    await first.start_analysis()
    await second.start_analysis()

    async def both_listed() -> bool:
        # Each lists itself at once: each must list the other too.
        for each in (first, second):
            status = await each.analysis.GetQueueStatus(apb.GetQueueStatusRequest())
            if len(status.replicas) != 2 or status.workers_total != 4:
                return False
        return True

    await wait_until(both_listed)
    status = await second.analysis.GetQueueStatus(apb.GetQueueStatusRequest())
    assert {r.state for r in status.replicas} == {apb.REPLICA_STATE_LIVE}
    assert status.workers_total == 4


async def test_every_replica_reports_the_throughput_of_the_cluster(
    make_cluster: Callable[..., Cluster], postgres_url: str
) -> None:
    """The jobs finished in the last minute, and the wait estimated from their durations,
    are the cluster's, whichever replica answers: here one without workers."""
    config = AnalysisConfig(
        workers=2, database_url=postgres_url, rate_limits={"local": RateLimitConfig(50, 1)}
    )
    working = make_cluster(analysis_config=config)
    watching = make_cluster(analysis_config=replace(config, workers=0))
    await working.start_analysis()
    await working.start_ingest()
    await watching.start_analysis()
    ids = [m.id for m in (await upload(working, image_files(3, first_seed=20))).media]
    await wait_terminal(working, ids)

    async def both_report_the_three() -> bool:
        statuses = [
            await each.analysis.GetQueueStatus(apb.GetQueueStatusRequest())
            for each in (working, watching)
        ]
        return [s.completed_last_minute for s in statuses] == [3, 3]

    # The working replica's heartbeat brings its figures to the other.
    await wait_until(both_report_the_three)
    # With the queue empty, the wait is one job's mean duration, the same from either.
    first, second = [
        (await each.analysis.GetQueueStatus(apb.GetQueueStatusRequest())).estimated_wait
        for each in (working, watching)
    ]
    assert first.ToTimedelta() == second.ToTimedelta()
