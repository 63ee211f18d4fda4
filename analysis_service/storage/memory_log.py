"""The event log of :class:`~analysis_service.storage.memory_store.MemoryQueueStore`: events
by revision, the revision counter and the compaction watermark (as ``events`` and the
``counters`` rows do in SQL)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from analysis_service.domain.models import StatusEvent
from analysis_service.domain.store import EventFilter, LogCompacted
from analysis_service.storage.memory_results import MemoryResults


@dataclass(frozen=True)
class _LoggedEvent:
    """An event as the log keeps it: its result by key, joined when read."""

    event: StatusEvent
    result_key: str | None
    reused: bool


def matches(events: EventFilter, media_id: str, owner_id: str) -> bool:
    """Whether a change of ``media_id`` (of ``owner_id``) is one ``events`` asks for."""
    if events.media_ids and media_id not in events.media_ids:
        return False
    return not events.owner_id or owner_id == events.owner_id


class MemoryEventLog:
    """Status changes with gap-free revisions, oldest first, compacted from the oldest."""

    def __init__(self, results: MemoryResults) -> None:
        self._results = results
        self._events: list[_LoggedEvent] = []
        self.revision = 0
        self.compacted_through = 0

    def next_revision(self) -> int:
        self.revision += 1
        return self.revision

    def append(self, event: StatusEvent, result_key: str | None) -> None:
        """Keep ``event`` (numbered by :meth:`next_revision`), its result by ``result_key``."""
        reused = bool(event.result and event.result.reused)
        self._events.append(_LoggedEvent(replace(event, result=None), result_key, reused))

    def after(
        self, after: int, events: EventFilter, *, limit: int, with_embedding: bool
    ) -> list[StatusEvent]:
        """Up to ``limit`` matching events after revision ``after``; raises LogCompacted when
        some of them are gone."""
        if after < self.compacted_through:
            raise LogCompacted(after, self.compacted_through, self.revision)
        page = [
            logged
            for logged in self._events
            if logged.event.revision > after
            and matches(events, logged.event.media_id, logged.event.owner_id)
        ][:limit]
        return [
            replace(
                logged.event,
                result=self._results.get(
                    logged.result_key, reused=logged.reused, with_embedding=with_embedding
                ),
            )
            for logged in page
        ]

    def compact(self, *, before_time: float, keep_last: int) -> int:
        """Drop events older than ``before_time`` or beyond the newest ``keep_last``; the new
        watermark (every revision at or below it is gone)."""
        by_time = [e.event.revision for e in self._events if e.event.event_time < before_time]
        watermark = max(self.revision - keep_last, max(by_time, default=0), self.compacted_through)
        self._events = [e for e in self._events if e.event.revision > watermark]
        self.compacted_through = watermark
        return watermark
