"""The analysis service on SQLite serves from one process: a second on the same database is
refused at start (its watchers would miss the first one's changes), and the lock goes with
the process that held it, killed or stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from mediatag.ingest.v1 import ingest_pb2 as ipb

from analysis_service.server import create_server
from mediatag_common.database import DatabaseInUse
from mediatag_common.sole_process import HeldByAnotherProcess, SoleProcessLock
from tests.conftest import PATIENCE, Cluster, free_port
from tests.test_pipeline import image_files, upload, wait_terminal

# Takes the lock, says so, and holds it until killed.
HOLDER = """
import sys, time
from pathlib import Path
from mediatag_common.sole_process import SoleProcessLock
lock = SoleProcessLock(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(3600)
"""


def test_a_lock_held_by_a_process_is_refused_and_freed_when_it_is_killed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "analysis.db.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(HeldByAnotherProcess) as refused:
            SoleProcessLock(path)
        assert refused.value.holder == str(holder.pid)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(PATIENCE)
    # No stale lock after a kill -9: the kernel dropped it with the process.
    lock = SoleProcessLock(path)
    lock.release()
    lock.release()


async def test_a_second_analysis_service_on_one_sqlite_database_is_refused(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster()
    await cluster.start_analysis()
    await cluster.start_ingest()
    assert cluster.analysis_config is not None
    second = replace(cluster.analysis_config, port=free_port(), metrics_port=0)

    with pytest.raises(DatabaseInUse) as refused:
        await create_server(second)
    assert f"another process (pid {os.getpid()})" in str(refused.value)
    assert "several replicas need PostgreSQL" in str(refused.value)

    # The first serves on, and what it is given is analysed and watched as before.
    answer = await upload(cluster, image_files(1, first_seed=30))
    (done,) = await wait_terminal(cluster, [answer.media[0].id])
    assert done.status == ipb.PROCESSING_STATUS_COMPLETED

    # Stopped, it lets another serve from the database.
    await cluster.stop_analysis()
    host, _ = await create_server(second)
    await host.start()
    await host.stop(1.0)
