"""The queue store on SQLite or PostgreSQL (see :class:`analysis_service.domain.store.QueueStore`).

Events reach the hub once committed. On SQLite there is one process and one writer thread:
each transaction hands its events on after it commits, in commit order. On PostgreSQL
several replicas write: no process sees every commit, so none publishes its own at commit;
each replica's :class:`~analysis_service.storage.tailer.EventTailer` publishes the log in
revision order, reading the other replicas' changes and taking its own as they commit.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection

from analysis_service.domain.models import ClaimedJob, Job, JobResult, JobSpec, JobStatus
from analysis_service.domain.models import StatusEvent as Event
from analysis_service.domain.store import (
    AttemptEnd,
    EventFilter,
    ExpiredLease,
    LogCompacted,
    QueueDepth,
    StatePage,
    check_distinct_keys,
)
from analysis_service.storage import attempt_ends, job_reads, schema, turns
from analysis_service.storage import events as event_log
from analysis_service.storage import jobs as job_rows
from analysis_service.storage import results as result_rows
from analysis_service.storage.events import EventDraft
from analysis_service.storage.session import consistent_read, read, statement, write
from mediatag_common.database import POSTGRESQL, SQLITE, Database, after_commit, database_now
from mediatag_common.group_commit import GroupCommit


class SqlQueueStore:
    """The queue, its event log and the result cache in one SQL database."""

    def __init__(self, db: Database, *, committed: Callable[[list[Event]], None]) -> None:
        """``committed`` gets the events of each transaction once it commits: on SQLite, in
        commit order, to publish; on PostgreSQL, for the tailer (see the module docstring)."""
        self._db = db
        self._committed = committed
        self.shared = db.dialect != SQLITE
        # The queue groups its claims and, apart, its ends of attempts; a group of each that
        # queue up while a transaction runs share the next one (one commit, one turn at the
        # counter rows' locks, which every event-writing transaction takes).
        self._turns: GroupCommit[_Claim | _Ends, _Turn] = GroupCommit(self._take_turns)

    def now(self) -> float:
        # Due times come from the database's clock; a replica's clock is assumed close to it
        # (NTP): a skew only makes an idle worker look for due work a little early or late.
        return time.time()

    def _record(self, conn: Connection, drafts: Sequence[EventDraft]) -> list[Event]:
        """Append the events (and keep the counts); hand them on after commit."""
        events = event_log.record(conn, drafts)
        if events:
            after_commit(conn, lambda: self._committed(events))
        return events

    async def log_bounds(self) -> tuple[int, int]:
        def bounds(conn: Connection) -> tuple[int, int]:
            return (
                event_log.read_counter(conn, schema.REVISION),
                event_log.read_counter(conn, schema.COMPACTED_THROUGH),
            )

        return await consistent_read(self._db, bounds)

    # -- transitions -------------------------------------------------------------------------

    async def submit(
        self, specs: Sequence[JobSpec], *, max_attempts: int
    ) -> tuple[list[str], list[str]]:
        def transaction(conn: Connection) -> tuple[list[str], list[str]]:
            inserted = job_rows.insert_new_jobs(conn, specs, max_attempts=max_attempts)
            new = [s for s in specs if s.media_id in inserted]
            self._record(
                conn,
                [EventDraft(s.media_id, s.owner_id, JobStatus.PENDING, None, 0) for s in new],
            )
            known = sorted({s.media_id for s in specs} - inserted)
            return [s.media_id for s in new], known

        return await write(self._db, transaction)

    async def claim(self, holder: str, count: int, lease_seconds: float) -> list[ClaimedJob]:
        turn = await self._turns.commit(_Claim(holder, count, lease_seconds))
        return turn.claimed

    async def renew(self, job: ClaimedJob, lease_seconds: float) -> bool:
        def transaction(conn: Connection) -> bool:
            until = database_now(conn) + lease_seconds
            return job_rows.fenced_update(
                conn, job.spec.media_id, job.lease_token, {"lease_expires_at": until}
            )

        return await write(self._db, transaction)

    async def end_attempts(self, ends: Sequence[AttemptEnd]) -> list[Event | None]:
        turn = await self._turns.commit(_Ends(ends))
        return turn.ended

    async def _take_turns(self, requests: Sequence[_Claim | _Ends]) -> list[_Turn]:
        """Claims and ends in one transaction, in the order they were asked for."""
        claims = [request for request in requests if isinstance(request, _Claim)]
        ends = [end for request in requests if isinstance(request, _Ends) for end in request.ends]
        if (
            self.shared
            and turns.can_take(ends)
            and len({(claim.holder, claim.lease_seconds) for claim in claims}) <= 1
        ):
            return await self._take_turns_at_once(requests, claims, ends)

        def transaction(conn: Connection) -> list[_Turn]:
            turns: list[_Turn] = []
            drafts: list[EventDraft] = []
            for request in requests:
                turn = _Turn(first_draft=len(drafts))
                if isinstance(request, _Claim):
                    rows = job_rows.claim_due(
                        conn,
                        holder=request.holder,
                        count=request.count,
                        lease_seconds=request.lease_seconds,
                    )
                    turn.claimed = [job_rows.claimed_job(row) for row in rows]
                    drafts.extend(_claim_draft(row) for row in rows)
                else:
                    result_rows.store_new_results(conn, request.ends)
                    turn.written = attempt_ends.end_attempts(conn, request.ends)
                    drafts.extend(_written_drafts(request.ends, turn.written))
                turns.append(turn)
            events = self._record(conn, drafts)
            for turn in turns:
                turn.take_events(events)
            return turns

        return await write(self._db, transaction)

    async def _take_turns_at_once(
        self, requests: Sequence[_Claim | _Ends], claims: Sequence[_Claim], ends: list[AttemptEnd]
    ) -> list[_Turn]:
        """PostgreSQL: the turn as one statement (see :mod:`.turns`); the new results first,
        in a statement of their own (storing a result twice changes nothing)."""
        if any(end.new_result is not None for end in ends):
            await statement(self._db, lambda conn: result_rows.store_new_results(conn, ends))
        wrote = await statement(
            self._db,
            lambda conn: turns.take_turn(
                conn,
                ends,
                claim_count=sum(claim.count for claim in claims),
                holder=claims[0].holder if claims else "",
                lease_seconds=claims[0].lease_seconds if claims else 0.0,
            ),
        )
        events: list[Event] = []
        claimed = iter(wrote.claimed)
        written = iter(wrote.ended)
        taken: list[_Turn] = []
        for request in requests:
            turn = _Turn(first_draft=0)
            if isinstance(request, _Claim):
                for row in itertools.islice(claimed, request.count):
                    turn.claimed.append(job_rows.claimed_job(row))
                    event = _claim_draft(row).event(row.revision, row.updated_at)
                    events.append(event)
            else:
                for end in request.ends:
                    at = next(written)
                    turn.written.append(None if at is None else at[1])
                    event = None
                    if at is not None:
                        event = _end_draft(end, at[1]).event(*at)
                        events.append(event)
                    turn.ended.append(event)
            taken.append(turn)
        events.sort(key=lambda event: event.revision)
        if events:
            self._committed(events)
        return taken

    async def expire_leases(self, decide: Callable[[ExpiredLease], AttemptEnd]) -> list[Event]:
        def transaction(conn: Connection) -> list[Event]:
            rows = job_rows.expired_leases(conn, database_now(conn))
            ends = [
                decide(ExpiredLease(job_rows.claimed_job(row), row.max_attempts)) for row in rows
            ]
            written = attempt_ends.end_attempts(conn, ends)
            return self._record(conn, list(_written_drafts(ends, written)))

        return await write(self._db, transaction)

    async def retry(
        self, media_ids: Collection[str], *, owner_id: str, status: JobStatus
    ) -> tuple[list[str], list[str]]:
        def transaction(conn: Connection) -> tuple[list[str], list[str]]:
            now = database_now(conn)
            if media_ids:
                missing = sorted(set(media_ids) - job_reads.known_ids(conn, media_ids))
                if missing:
                    return [], missing
                rows = [
                    row
                    for terminal in (JobStatus.FAILED, JobStatus.COMPLETED)
                    for row in job_rows.job_rows(conn, media_ids, status=terminal)
                ]
            else:
                rows = job_rows.job_rows(conn, owner_id=owner_id, status=status)
            retried = [row.media_id for row in rows]
            if retried:
                job_rows.reset_for_retry(conn, retried, now=now)
            self._record(
                conn,
                [
                    EventDraft(
                        row.media_id, row.owner_id, JobStatus.PENDING, JobStatus(row.status), 0
                    )
                    for row in rows
                ],
            )
            return retried, []

        return await write(self._db, transaction)

    async def set_paused(self, paused: bool) -> None:
        def transaction(conn: Connection) -> None:
            event_log.write_counter(conn, schema.PAUSED, int(paused))
            if self.shared and not paused:
                # The other replicas' workers wait for work until their next look otherwise.
                event_log.notify_replicas(conn)

        await write(self._db, transaction)

    async def is_paused(self) -> bool:
        return bool(await read(self._db, lambda conn: event_log.read_counter(conn, schema.PAUSED)))

    async def next_due_time(self) -> float | None:
        return await read(self._db, job_reads.next_due_time)

    # -- reads -------------------------------------------------------------------------------

    async def get_job(self, media_id: str, *, with_embedding: bool) -> Job | None:
        return await read(
            self._db,
            lambda conn: job_reads.get_job(conn, media_id, with_embedding=with_embedding),
        )

    async def owners_of(self, media_ids: Sequence[str]) -> dict[str, str]:
        return await read(self._db, lambda conn: job_reads.owners_of(conn, media_ids))

    async def list_jobs(
        self,
        *,
        status: JobStatus | None,
        owner_id: str,
        error_reason: str,
        after: Sequence[Any] | None,
        limit: int,
        with_embedding: bool,
    ) -> list[Job]:
        return await read(
            self._db,
            lambda conn: job_reads.list_jobs(
                conn,
                status=status,
                owner_id=owner_id,
                error_reason=error_reason,
                after=after,
                limit=limit,
                with_embedding=with_embedding,
            ),
        )

    async def depth(self) -> QueueDepth:
        def query(conn: Connection) -> QueueDepth:
            return QueueDepth(
                job_reads.counts_by_status(conn), job_reads.oldest_pending_submission(conn)
            )

        return await consistent_read(self._db, query)

    # -- the event log -----------------------------------------------------------------------

    async def state_page(
        self, events: EventFilter, *, after_media_id: str, limit: int, with_embedding: bool
    ) -> StatePage:
        def snapshot(conn: Connection) -> StatePage:
            return StatePage(
                event_log.read_counter(conn, schema.REVISION),
                event_log.read_counter(conn, schema.COMPACTED_THROUGH),
                event_log.current_states(
                    conn,
                    after_media_id=after_media_id,
                    limit=limit,
                    media_ids=events.media_ids,
                    owner_id=events.owner_id,
                    with_embedding=with_embedding,
                ),
            )

        return await consistent_read(self._db, snapshot)

    async def events_after(
        self, after: int, events: EventFilter, *, limit: int, with_embedding: bool
    ) -> list[Event]:
        def read_page(conn: Connection) -> list[Event]:
            page = event_log.read_events(
                conn,
                after_revision=after,
                limit=limit,
                media_ids=events.media_ids,
                owner_id=events.owner_id,
                with_embedding=with_embedding,
            )
            # Compaction may have overtaken this reader since its last page (a slow client).
            # The watermark is read after the page: if it is still at or below ``after``,
            # nothing the page should hold had been deleted when it was read.
            compacted_through = event_log.read_counter(conn, schema.COMPACTED_THROUGH)
            if after < compacted_through:
                current = event_log.read_counter(conn, schema.REVISION)
                raise LogCompacted(after, compacted_through, current)
            return page

        return await read(self._db, read_page)

    async def compact(self, *, max_age: float, max_events: int) -> int:
        def transaction(conn: Connection) -> int:
            now = database_now(conn)
            result_rows.drop_expired_claims(conn, now)
            return event_log.compact(conn, before_time=now - max_age, keep_last=max_events)

        return await write(self._db, transaction)

    # -- the result cache --------------------------------------------------------------------

    async def cached_results(self, keys: Sequence[str]) -> Sequence[JobResult | None]:
        return await read(self._db, lambda conn: result_rows.get_results(conn, keys))

    async def store_result(
        self, key: str, sha256: str, result: JobResult, *, holder: str | None
    ) -> None:
        def transaction(conn: Connection) -> None:
            result_rows.store_result(conn, key, sha256, result, database_now(conn))
            if holder is not None:
                result_rows.end_result_claim(conn, key, holder)

        await write(self._db, transaction)

    async def take_analyses(
        self, keys: Sequence[str], holder: str, lease_seconds: float
    ) -> Sequence[JobResult | bool]:
        check_distinct_keys(keys)
        if self._db.dialect == POSTGRESQL:
            return await statement(
                self._db,
                lambda conn: result_rows.take_result_claims_committed(
                    conn, keys, holder, lease_seconds=lease_seconds
                ),
            )
        return await write(
            self._db,
            lambda conn: result_rows.take_result_claims(
                conn, keys, holder, lease_seconds=lease_seconds
            ),
        )

    async def drop_analysis(self, key: str, holder: str) -> None:
        await write(self._db, lambda conn: result_rows.drop_result_claim(conn, key, holder))


def _written_drafts(
    ends: Sequence[AttemptEnd], written: Sequence[float | None]
) -> Iterator[EventDraft]:
    """The event of each end that was written (at the time it was written)."""
    for end, at in zip(ends, written, strict=True):
        if at is not None:
            yield _end_draft(end, at)


def _end_draft(end: AttemptEnd, at: float) -> EventDraft:
    """The event of ``end``, written at ``at``."""
    return EventDraft(
        end.job.spec.media_id,
        end.job.spec.owner_id,
        end.status,
        JobStatus.PROCESSING,
        end.attempt,
        result=end.result,
        result_key=end.result_key,
        error=end.error,
        next_attempt_at=None if end.delay is None else at + end.delay,
    )


@dataclass(frozen=True)
class _Claim:
    holder: str
    count: int
    lease_seconds: float


@dataclass(frozen=True)
class _Ends:
    ends: Sequence[AttemptEnd]


@dataclass
class _Turn:
    """What one claim or one group of ends got from a shared transaction."""

    first_draft: int
    claimed: list[ClaimedJob] = field(default_factory=list)
    # For each end: when it was written, or None if it was fenced out.
    written: list[float | None] = field(default_factory=list)
    ended: list[Event | None] = field(default_factory=list)

    def take_events(self, events: Sequence[Event]) -> None:
        """Each written end's event, from the transaction's events (in draft order)."""
        mine = iter(events[self.first_draft :])
        self.ended = [None if at is None else next(mine) for at in self.written]


def _claim_draft(row: Any) -> EventDraft:
    return EventDraft(
        row.media_id, row.owner_id, JobStatus.PROCESSING, JobStatus.PENDING, row.attempt
    )
