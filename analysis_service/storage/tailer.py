"""One ordered stream of the cluster's events for this replica (PostgreSQL).

Every transaction that writes events sends one NOTIFY carrying its newest revision. The
tailer listens on a connection of its own and, on each notification and at least every
``POLL_SECONDS``, reads ``revision > cursor ORDER BY revision`` and hands the events to the
hub: a lost notification (or a dropped connection) costs latency, never an event. Revisions
commit in order (the counter row's lock), so a reader that sees revision n has seen every
revision before it.

This replica's own events are not read back: the store hands them over once committed
(:meth:`EventTailer.committed`), and those next in order (revision cursor + 1 and on) are
published at once; a notification they cover needs no read. A revision is one transaction's
alone, so the event of revision cursor + 1 this replica committed is the next in the log.

What one read of the log returns, page after page, goes to the hub in one publish (up to
``MAX_PUBLISH`` events), as a commit does on SQLite: a large commit (a retry of thousands of
jobs) is then one burst to the watchers, forgiven to one that keeps up, not pages each counted
against its buffer. A hole in the log (compaction overtook this replica) ends every watcher
instead of handing it over (see :meth:`StatusHub.publish`).

Why psycopg's own asyncio connection here, when the rest goes through threads: LISTEN
needs a connection that waits for the server, and an asyncio one waits without a thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import psycopg
from sqlalchemy.engine import Connection

from analysis_service.domain.models import StatusEvent
from analysis_service.errors import AnalysisError
from analysis_service.storage import events as event_log
from analysis_service.storage.session import read
from mediatag_common.database import Database, libpq_conninfo, postgresql_connect_args
from mediatag_common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
PAGE = 1000
# Own events kept for publishing, at most (beyond, they are read back from the log): a few
# groups' worth while the tailer keeps up; each may hold an embedding.
MAX_OWN_EVENTS = 1000
# Events of one read handed to the hub in one publish, at most: they are held until then, and a
# watcher keeping up holds them all as one burst (each may hold an embedding: about 60 MB at
# 1408 dimensions). A read that goes on beyond is published in parts of this size, each to the
# watchers a commit of its own.
MAX_PUBLISH = 10 * PAGE
RECONNECT_SECONDS = 1.0
# The listening connection's name in pg_stat_activity.
TAILER_APPLICATION = "mediatag-tailer"


class Publish(Protocol):
    """The hub's :meth:`~analysis_service.domain.hub.StatusHub.publish`."""

    def __call__(self, events: Sequence[StatusEvent], *, follows_gap: bool = False) -> None: ...


class EventTailer:
    """Reads the event log after ``cursor`` in order and publishes it; wakes the workers on
    every notification (a submission or a resume on another replica)."""

    def __init__(self, db: Database, *, publish: Publish) -> None:
        self._db = db
        # Published through this revision.
        self._cursor = 0
        self._publish = publish
        self._wake: Callable[[], None] = lambda: None
        self._task: asyncio.Task[None] | None = None
        # This replica's committed events not yet published, by revision.
        self._own: dict[int, StatusEvent] = {}
        # A read of the log is under way: it holds events after the cursor not yet published.
        self._reading = False
        self._conninfo = libpq_conninfo(db.url)

    def start(self, cursor: int, wake: Callable[[], None]) -> None:
        """Publish every event after revision ``cursor``, in order, until stopped; ``wake``
        the workers on every notification."""
        # Own events committed before may have been published already.
        self._cursor = max(self._cursor, cursor)
        self._wake = wake
        self._task = asyncio.create_task(self._run(), name="event-tailer")

    def committed(self, events: list[StatusEvent]) -> None:
        """Events this replica committed (on the event loop, after the commit)."""
        if len(self._own) + len(events) > MAX_OWN_EVENTS:
            return
        for event in events:
            if event.revision > self._cursor:
                self._own[event.revision] = event
        self._publish_own()

    def _publish_own(self) -> None:
        """Publish the own events next in order (once a read under way has published what
        it read: they may be among it, or come after it)."""
        if self._reading:
            return
        ready = []
        while (event := self._own.pop(self._cursor + 1, None)) is not None:
            ready.append(event)
            self._cursor = event.revision
        if ready:
            self._publish(ready)

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
        # Bounded like the pool's: a connection lost without a word (a server gone, a
        # firewall that forgot it) is noticed and replaced, not listened on for good with
        # every change a poll late.
        connection = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, **postgresql_connect_args(TAILER_APPLICATION)
        )
        async with connection:
            await connection.execute(f"LISTEN {event_log.NOTIFY_CHANNEL}")
            # Listening first, then reading: a commit between the two is read now, and one
            # after it is notified.
            await self._catch_up()
            while True:
                notified, newest = False, None
                async for notify in connection.notifies(timeout=POLL_SECONDS, stop_after=1):
                    notified, newest = True, _revision(notify.payload)
                if notified:
                    self._wake()
                # Read unless this replica's own events cover what was notified (a poll
                # always reads).
                self._publish_own()
                if newest is None or self._cursor < newest:
                    await self._catch_up()

    async def _catch_up(self) -> None:
        self._reading = True
        try:
            await self._read_log()
        finally:
            self._reading = False
        # Own events read back from the log are published; those after them are next.
        for revision in [revision for revision in self._own if revision <= self._cursor]:
            del self._own[revision]
        self._publish_own()

    async def _read_log(self) -> None:
        """Publish the log after the cursor: the pages of this read together (see
        ``MAX_PUBLISH``). Nothing is published meanwhile (own events wait, ``_reading``), so
        the cursor moves only here; a read that fails leaves it where the last publish did."""
        held: list[StatusEvent] = []
        follows_gap = False
        while True:
            after = held[-1].revision if held else self._cursor
            page = await read(self._db, functools.partial(_page_after, after=after))
            if page and page[0].revision != after + 1:
                # Compaction overtook this replica (it could not read the log for longer
                # than the log keeps): its watchers must not be handed the hole.
                logger.warning(
                    "event log compacted past this replica's revision %d (next is %d): "
                    "its watchers are ended, to resume from the log",
                    after,
                    page[0].revision,
                )
                self._hand_over(held, follows_gap=follows_gap)
                held, follows_gap = [], True
            held.extend(page)
            if len(held) >= MAX_PUBLISH:
                self._hand_over(held, follows_gap=follows_gap)
                held, follows_gap = [], False
            if len(page) < PAGE:
                break
        self._hand_over(held, follows_gap=follows_gap)

    def _hand_over(self, events: list[StatusEvent], *, follows_gap: bool) -> None:
        if events:
            self._cursor = events[-1].revision
            self._publish(events, follows_gap=follows_gap)


def _page_after(conn: Connection, *, after: int) -> list[StatusEvent]:
    return event_log.read_events(conn, after_revision=after, limit=PAGE, with_embedding=True)


def _revision(payload: str) -> int | None:
    """The newest revision a notification carries (None: it carries none)."""
    try:
        return int(payload)
    except ValueError:
        return None
