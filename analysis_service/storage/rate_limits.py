"""The upstream APIs' rate limits kept in PostgreSQL, one row per API for every replica.

Each reservation is one ``UPDATE … RETURNING`` of the API's row that applies the domain's
GCRA rule (:class:`analysis_service.domain.limits.Gcra`) on the database's clock
(``clock_timestamp()``): the row lock orders replicas, the answer is the time to wait, and
the replicas' own clocks never enter into it. Times are epoch seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.expression import Subquery

from analysis_service.domain.limits import Gcra, SharedReading, Slot
from analysis_service.storage import session
from analysis_service.storage.clock import database_now
from analysis_service.storage.schema import rate_limits
from mediatag_common.database import POSTGRESQL, Database

# The GCRA rule's values: SQL expressions evaluated by the database.
_Sql = ColumnElement[Any]


def _latest(first: _Sql, second: _Sql) -> _Sql:
    return sa.func.greatest(first, second)


_ARRIVAL: _Sql = rate_limits.c.theoretical_arrival


def _clock(api: str) -> Subquery:
    """The row (api, now) an update of ``api``'s row joins: ``now`` read once per statement
    (``clock_timestamp()`` changes as a statement runs)."""
    return sa.select(sa.literal(api).label("api"), database_now(POSTGRESQL).label("now")).subquery(
        "clock"
    )


class DatabaseSlots:
    """:class:`analysis_service.domain.limits.SharedSlots` on PostgreSQL."""

    def __init__(self, db: Database) -> None:
        if db.dialect != POSTGRESQL:
            raise ValueError("rate limits shared by replicas need PostgreSQL")
        self._db = db
        # Built once per API and rule (a reservation precedes every analyser call; building
        # the statement cost more than running it). The APIs and rules are the configured ones.
        self._reservations: dict[tuple[str, Gcra, float], sa.Update] = {}

    async def reserve(self, api: str, rule: Gcra, window: float) -> Slot:
        key = (api, rule, window)
        statement = self._reservations.get(key)
        if statement is None:
            statement = self._reservations[key] = _reservation(api, rule, window)

        def reserve(conn: Connection) -> Slot:
            row = _update_row(conn, api, statement)
            return Slot(at=float(row[0]), now=float(row[1]))

        # One statement, committed by itself: no BEGIN and COMMIT round trips.
        return await session.statement(self._db, reserve)

    async def pause(self, api: str, rule: Gcra, seconds: float) -> None:
        def pause(conn: Connection) -> None:
            clock = _clock(api)
            until: _Sql = clock.c.now + seconds
            statement = (
                sa.update(rate_limits)
                .where(rate_limits.c.api == clock.c.api)
                .values(
                    theoretical_arrival=rule.pause(_ARRIVAL, until, _latest),
                    paused_until=_latest(rate_limits.c.paused_until, until),
                    quota_errors=rate_limits.c.quota_errors + 1,
                )
                .returning(rate_limits.c.paused_until)
            )
            _update_row(conn, api, statement)

        await session.write(self._db, pause)

    async def read(self) -> tuple[Mapping[str, SharedReading], float]:
        def read(conn: Connection) -> tuple[Mapping[str, SharedReading], float]:
            now = conn.execute(sa.select(database_now(POSTGRESQL))).scalar_one()
            rows = conn.execute(sa.select(rate_limits))
            readings = {
                row.api: SharedReading(
                    paused_until=row.paused_until,
                    quota_errors=row.quota_errors,
                    window_start=row.window_start,
                    window_calls=row.window_calls,
                    previous_window_calls=row.previous_window_calls,
                )
                for row in rows
            }
            return readings, float(now)

        return await session.read(self._db, read)

    async def pause_end(self, api: str) -> tuple[float, float]:
        clock = _clock(api)
        query = sa.select(
            sa.func.coalesce(
                sa.select(rate_limits.c.paused_until)
                .where(rate_limits.c.api == clock.c.api)
                .scalar_subquery(),
                0.0,
            ),
            clock.c.now,
        )

        def read(conn: Connection) -> tuple[float, float]:
            paused_until, now = conn.execute(query).one()
            return float(paused_until), float(now)

        return await session.read(self._db, read)


def _reservation(api: str, rule: Gcra, window: float) -> sa.Update:
    """The statement that reserves a slot of ``api``'s row under ``rule`` and returns when the
    slot comes and the database's clock, counting the call in fixed windows of ``window``."""
    clock = _clock(api)
    now: _Sql = clock.c.now
    # RETURNING sees the row as updated: the slot comes from the advanced TAT.
    allowed_at = rule.slot(_ARRIVAL, now, _latest)
    window_start = sa.func.floor(now / window) * window
    same_window = rate_limits.c.window_start == window_start
    next_window = rate_limits.c.window_start == window_start - window
    return (
        sa.update(rate_limits)
        .where(rate_limits.c.api == clock.c.api)
        .values(
            theoretical_arrival=rule.advance(_ARRIVAL, now, _latest),
            window_start=window_start,
            window_calls=sa.case((same_window, rate_limits.c.window_calls + 1), else_=1),
            previous_window_calls=sa.case(
                (same_window, rate_limits.c.previous_window_calls),
                (next_window, rate_limits.c.window_calls),
                else_=0,
            ),
        )
        .returning(allowed_at, now)
    )


def _update_row(conn: Connection, api: str, statement: sa.Update) -> tuple[Any, ...]:
    """What ``statement`` returns from the row of ``api``, made first if it has none (the
    first call to an API ever: the row starts with nothing reserved)."""
    returned = conn.execute(statement).one_or_none()
    if returned is None:
        conn.execute(
            insert(rate_limits)
            .values(
                api=api,
                theoretical_arrival=0.0,
                paused_until=0.0,
                quota_errors=0,
                window_start=0.0,
                window_calls=0,
                previous_window_calls=0,
            )
            .on_conflict_do_nothing()
        )
        returned = conn.execute(statement).one()
    return tuple(returned)
