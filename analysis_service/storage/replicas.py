"""The replicas' heartbeat rows (table ``replicas``), on SQLite and PostgreSQL alike."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from analysis_service.domain.models import ReplicaState
from analysis_service.domain.replicas import Heartbeat
from analysis_service.storage import session
from analysis_service.storage.clock import database_now
from analysis_service.storage.schema import replicas
from mediatag_common.database import POSTGRESQL, Database


class DatabaseReplicas:
    """:class:`analysis_service.domain.replicas.ReplicaStore` on the analysis database."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._now = database_now(db.dialect)
        self._insert = postgresql.insert if db.dialect == POSTGRESQL else sqlite.insert

    async def beat(self, heartbeat: Heartbeat, prune_after: float) -> None:
        def beat(conn: Connection) -> None:
            insert = self._insert(replicas).values(
                replica_id=heartbeat.replica_id,
                host=heartbeat.host,
                pid=heartbeat.pid,
                workers_total=heartbeat.workers_total,
                workers_busy=heartbeat.workers_busy,
                finished_last_minute=heartbeat.finished_last_minute,
                busy_seconds_last_minute=heartbeat.busy_seconds_last_minute,
                started_at=self._now,
                last_seen=self._now,
            )
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=[replicas.c.replica_id],
                    set_={
                        "workers_total": insert.excluded.workers_total,
                        "workers_busy": insert.excluded.workers_busy,
                        "finished_last_minute": insert.excluded.finished_last_minute,
                        "busy_seconds_last_minute": insert.excluded.busy_seconds_last_minute,
                        "last_seen": insert.excluded.last_seen,
                    },
                )
            )
            conn.execute(sa.delete(replicas).where(replicas.c.last_seen < self._now - prune_after))

        await session.write(self._db, beat)

    async def replicas(self) -> tuple[tuple[ReplicaState, ...], float]:
        def read(conn: Connection) -> tuple[tuple[ReplicaState, ...], float]:
            now = float(conn.execute(sa.select(self._now)).scalar_one())
            rows = conn.execute(sa.select(replicas))
            return tuple(
                ReplicaState(
                    replica_id=row.replica_id,
                    host=row.host,
                    pid=row.pid,
                    workers_total=row.workers_total,
                    workers_busy=row.workers_busy,
                    started_at=row.started_at,
                    last_seen=row.last_seen,
                    live=True,
                    finished_last_minute=row.finished_last_minute,
                    busy_seconds_last_minute=row.busy_seconds_last_minute,
                )
                for row in rows
            ), now

        return await session.read(self._db, read)

    async def remove(self, replica_id: str) -> None:
        await session.write(
            self._db,
            lambda conn: conn.execute(
                sa.delete(replicas).where(replicas.c.replica_id == replica_id)
            ),
        )
