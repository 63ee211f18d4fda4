"""The analysis replicas sharing one database, as each one's heartbeat tells.

Every replica writes its row (host, pid, workers, the jobs finished in the last minute and
how long they took) every :data:`HEARTBEAT_INTERVAL` seconds on the database's clock; a row
not refreshed for :data:`GONE_AFTER` seconds is shown as gone (its workers no longer count),
and heartbeats delete rows older than :data:`PRUNE_AFTER`. A replica that stops cleanly
removes its own row. On SQLite the table holds the one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from analysis_service.domain.models import ReplicaState
from analysis_service.errors import StorageUnavailable

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 3.0
# Three missed heartbeats: stopped, killed, or cut off from the database.
GONE_AFTER = 3 * HEARTBEAT_INTERVAL
PRUNE_AFTER = 600.0


@dataclass(frozen=True)
class Heartbeat:
    """What a replica says of itself."""

    replica_id: str
    host: str
    pid: int
    workers_total: int
    workers_busy: int
    # Jobs its workers finished in the last minute, and the seconds they took, summed.
    finished_last_minute: int = 0
    busy_seconds_last_minute: float = 0.0


class ReplicaStore(Protocol):
    """The replicas' rows (the storage implements it; times on the database's clock)."""

    async def beat(self, heartbeat: Heartbeat, prune_after: float) -> None:
        """Write this replica's row (``started_at`` when new, ``last_seen`` now) and delete
        rows not seen for ``prune_after`` seconds."""

    async def replicas(self) -> tuple[tuple[ReplicaState, ...], float]:
        """Every row (``live`` left True), and the database's clock."""

    async def remove(self, replica_id: str) -> None:
        """Delete one replica's row."""


class Replicas:
    """This replica's heartbeat, and the cluster as the rows show it."""

    def __init__(
        self,
        store: ReplicaStore,
        *,
        workers_total: int,
        workers_busy: Callable[[], int],
        finished_last_minute: Callable[[], tuple[int, float]],
        interval: float = HEARTBEAT_INTERVAL,
    ) -> None:
        """``finished_last_minute``: the jobs this replica's workers finished in the last
        minute, and the seconds they took, summed."""
        self._store = store
        self._workers_total = workers_total
        self._workers_busy = workers_busy
        self._finished_last_minute = finished_last_minute
        self._interval = interval
        self.replica_id = uuid.uuid4().hex[:12]
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._task: asyncio.Task[None] | None = None

    def _heartbeat(self) -> Heartbeat:
        finished, busy_seconds = self._finished_last_minute()
        return Heartbeat(
            replica_id=self.replica_id,
            host=self._host,
            pid=self._pid,
            workers_total=self._workers_total,
            workers_busy=self._workers_busy(),
            finished_last_minute=finished,
            busy_seconds_last_minute=busy_seconds,
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat(), name="replica-heartbeat")

    async def stop(self) -> None:
        """Stop beating and remove this replica's row (a stopped replica is not "gone")."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self._store.remove(self.replica_id)
        except StorageUnavailable as exc:
            logger.warning("could not remove this replica's row (%s); it will be pruned", exc)

    async def _beat(self) -> None:
        while True:
            try:
                await self._store.beat(self._heartbeat(), PRUNE_AFTER)
            except StorageUnavailable as exc:
                logger.error("replica heartbeat failed: %s", exc)
            await asyncio.sleep(self._interval)

    async def cluster(self) -> tuple[ReplicaState, ...]:
        """Every replica, this one with its figures of this moment, oldest first."""
        rows, now = await self._store.replicas()
        here = self._heartbeat()
        own = next((r for r in rows if r.replica_id == self.replica_id), None)
        this = ReplicaState(
            replica_id=here.replica_id,
            host=here.host,
            pid=here.pid,
            workers_total=here.workers_total,
            workers_busy=here.workers_busy,
            started_at=own.started_at if own is not None else now,
            last_seen=now,
            live=True,
            finished_last_minute=here.finished_last_minute,
            busy_seconds_last_minute=here.busy_seconds_last_minute,
        )
        others = (
            replace(r, live=now - r.last_seen <= GONE_AFTER)
            for r in rows
            if r.replica_id != self.replica_id
        )
        return tuple(sorted((this, *others), key=lambda r: (r.started_at, r.replica_id)))
