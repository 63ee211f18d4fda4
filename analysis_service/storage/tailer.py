"""One ordered stream of the cluster's events for this replica (PostgreSQL).

Every transaction that writes events sends one NOTIFY carrying its newest revision. The
tailer listens on a connection of its own and, on each notification and at least every
``POLL_SECONDS``, reads ``revision > cursor ORDER BY revision`` and hands the events to the
hub: a lost notification (or a dropped connection) costs latency, never an event. Revisions
commit in order (the counter row's lock), so a reader that sees revision n has seen every
revision before it.

Why psycopg's own asyncio connection here, when the rest goes through threads: LISTEN
needs a connection that waits for the server, and an asyncio one waits without a thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

import psycopg
from sqlalchemy.engine import Connection

from analysis_service.domain.models import StatusEvent
from analysis_service.errors import AnalysisError
from analysis_service.storage import events as event_log
from analysis_service.storage.session import read
from mediatag_common.database import Database, database_url
from mediatag_common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
PAGE = 1000
RECONNECT_SECONDS = 1.0


class EventTailer:
    """Reads the event log after ``cursor`` in order and publishes it; wakes the workers on
    every notification (a submission or a resume on another replica)."""

    def __init__(
        self,
        db: Database,
        *,
        cursor: int,
        publish: Callable[[list[StatusEvent]], None],
        wake: Callable[[], None],
    ) -> None:
        self._db = db
        self._cursor = cursor
        self._publish = publish
        self._wake = wake
        self._task: asyncio.Task[None] | None = None
        url = database_url(db.url).set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-tailer")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError, AnalysisError) as exc:
                logger.error("event tailer lost the database (%s); reconnecting", exc)
                # Events committed meanwhile are read once connected again.
                await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen(self) -> None:
        connection = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, application_name="mediatag-tailer"
        )
        async with connection:
            await connection.execute(f"LISTEN {event_log.NOTIFY_CHANNEL}")
            while True:
                # Listening first, then reading: a commit between the two is read now, and
                # one after it is notified.
                await self._catch_up()
                notified = False
                async for _ in connection.notifies(timeout=POLL_SECONDS, stop_after=1):
                    notified = True
                if notified:
                    self._wake()

    async def _catch_up(self) -> None:
        while True:
            after = self._cursor
            events = await read(self._db, functools.partial(_page_after, after=after))
            if not events:
                return
            if events[0].revision != after + 1:
                # Compaction overtook this replica (it was away longer than the log keeps):
                # its watchers resume from the log and get REVISION_COMPACTED as usual.
                logger.warning(
                    "event log compacted past this replica's cursor %d (next is %d)",
                    after,
                    events[0].revision,
                )
            self._cursor = events[-1].revision
            self._publish(events)
            if len(events) < PAGE:
                return


def _page_after(conn: Connection, *, after: int) -> list[StatusEvent]:
    return event_log.read_events(conn, after_revision=after, limit=PAGE, with_embedding=True)
