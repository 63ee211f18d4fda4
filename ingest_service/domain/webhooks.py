"""Webhook deliveries: each terminal change sent to every endpoint that wants it, until accepted.

The status mirror inserts one delivery per matching endpoint in the transaction that applies
the change, so a delivery exists exactly when the change is applied, whatever the event log
keeps. :class:`WebhookDispatcher` sends them: each endpoint has its own loop and its own
``concurrency`` slots, so a slow or dead endpoint only ever holds its own. A loop claims due
deliveries of its endpoint for a lease (claims are exclusive across replicas: the store
skips rows another replica holds), sends each, and records the outcome under its claim. An
endpoint's ``concurrency`` holds across replicas: the store claims no more than the slots
that the endpoint's unexpired claims, whoever holds them, leave free. A replica that dies
mid-send loses its lease and another sends again: delivery is at least once, and the
``webhook-id`` stays the same so receivers can drop the duplicate. A loop that is stopped
(the service stopping, or its endpoint removed) gives back the deliveries it claimed but has
not sent, so that they are sent at once, here after a restart or by another replica, rather
than after the lease.

A failed attempt is retried after an exponential, jittered delay; once the next attempt would
fall past ``retry_period`` after the change, the delivery is dead: kept, counted, listed, and
sent again only when an operator revives it. Deliveries to an endpoint the webhooks file no
longer names are dead at once (at start, and after each reload): nothing would send them, and
left waiting they would count as pending for ever.

Times are the store's: leases, due times and the end of a retry period are read and written
on the database's clock, so replicas whose own clocks disagree still agree on when a lease
ends (two of them never send one delivery at once) and when a retry is due. This module
decides durations (the lease, the delay before a retry) and the rule applying them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from ingest_service.domain.models import ProcessingStatus
from ingest_service.domain.observer import WebhookObserver
from ingest_service.domain.webhook_endpoints import WebhookEndpoint, WebhookEndpoints
from ingest_service.errors import StorageConflict, StorageUnavailable
from mediatag_common.backoff import Backoff, jittered_delay
from mediatag_common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

# The last error of deliveries made dead because their endpoint left the webhooks file.
ENDPOINT_REMOVED = "the webhooks file no longer names this endpoint"


@dataclass(frozen=True)
class WebhookChange:
    """What a webhook tells: one item reached a terminal status at ``revision``."""

    media_id: str
    owner_id: str
    status: ProcessingStatus
    revision: int
    event_time: float

    @property
    def message_id(self) -> str:
        """The ``webhook-id``: one per change, the same on every attempt and endpoint."""
        return f"msg_{self.media_id}_{self.revision}"


@dataclass(frozen=True)
class Delivery:
    """One change for one endpoint, not yet accepted by it."""

    id: int
    endpoint: str
    change: WebhookChange
    created_at: float
    # Attempts that failed so far.
    attempts: int
    last_error: str | None = None
    dead_at: float | None = None
    # When it is due (dead: when it died).
    next_attempt_at: float | None = None


@dataclass(frozen=True)
class Claim:
    """Deliveries claimed for one endpoint; and in how many seconds it may have another to
    claim (its next delivery falls due, or, with every slot taken, the first lease ends),
    None when it has no other."""

    deliveries: Sequence[Delivery]
    next_due_in: float | None


@dataclass(frozen=True)
class Retry:
    """What one more failed attempt makes of a delivery: due again ``delay`` seconds after
    the failure, or dead if that is later than ``deadline`` (the end of its retry period)."""

    delay: float
    deadline: float

    def next_attempt(self, now: float) -> float | None:
        """When to try again, the failure being recorded at ``now`` (the store's clock, the
        one ``deadline`` is on); None: it is dead."""
        at = now + self.delay
        return at if at <= self.deadline else None


@dataclass(frozen=True)
class RetryPolicy:
    """Delays between attempts: ``initial`` doubling up to ``maximum``, jittered; a delivery
    is dead once its next attempt would be later than ``period`` after the change."""

    initial: float
    maximum: float
    period: float

    def after_failure(self, delivery: Delivery) -> Retry:
        """How ``delivery`` is retried after one more failure. The delay is this process's
        to draw; the moment it counts from is the store's, as is ``created_at``."""
        return Retry(
            delay=jittered_delay(self.initial, self.maximum, delivery.attempts),
            deadline=delivery.created_at + self.period,
        )


class DeliveryStore(Protocol):
    """Where deliveries are kept (the ingest database). Every time it reads or writes is on
    its own clock, the same for every replica."""

    async def claim(
        self, endpoint: str, limit: int, *, concurrency: int, lease: float, claimer: str
    ) -> Claim:
        """Up to ``limit`` due deliveries of ``endpoint``, held by ``claimer`` for ``lease``
        seconds, none of them held by another claimer; fewer if that would leave more than
        ``concurrency`` deliveries of ``endpoint`` held by anyone (whose lease has not
        ended)."""

    async def delivered(self, delivery_id: int, claimer: str) -> None:
        """Forget an accepted delivery (if ``claimer`` still holds it)."""

    async def release(self, delivery_ids: Collection[int], claimer: str) -> None:
        """Those of ``delivery_ids`` that ``claimer`` still holds: held by nobody and due
        now, their attempts not counted."""

    async def failed(self, delivery_id: int, claimer: str, *, error: str, retry: Retry) -> bool:
        """Record a failed attempt (if ``claimer`` still holds it), due again or dead as
        ``retry`` says from now; whether it died."""

    async def abandon(self, named: Collection[str], *, error: str) -> int:
        """Deliveries not dead to endpoints other than ``named``, claimed or not: dead now,
        with ``error``, held by nobody; how many. Safe to run at once from every replica."""

    async def revive(
        self,
        delivery_ids: Collection[int] | None,
        *,
        endpoints: Collection[str],
        owners: Collection[str] | None,
    ) -> int:
        """Dead deliveries to ``endpoints`` (those of ``delivery_ids``; None: all), of
        ``owners`` (None: every owner), due again now with a new retry period; how many."""


class WebhookSender(Protocol):
    """Sends one attempt of a delivery (HTTP, signed)."""

    async def send(self, endpoint: WebhookEndpoint, delivery: Delivery) -> str | None:
        """None when the endpoint accepted it; otherwise why not (``HTTP 500``,
        ``timeout``...), short and free of the URL."""


@dataclass(frozen=True)
class DispatchLimits:
    """``concurrency`` attempts in flight per endpoint (across every replica), each given
    ``timeout`` seconds (the claim's lease is longer); ``poll_interval``: how often an idle
    endpoint looks for deliveries enqueued by other replicas, or for a slot they freed."""

    concurrency: int
    timeout: float
    poll_interval: float

    @property
    def lease(self) -> float:
        return 3 * self.timeout + 10.0


class WebhookDispatcher:
    """Background loops sending the deliveries of every endpoint in use."""

    def __init__(
        self,
        *,
        store: DeliveryStore,
        sender: WebhookSender,
        endpoints: WebhookEndpoints,
        policy: RetryPolicy,
        limits: DispatchLimits,
        observer: WebhookObserver,
    ) -> None:
        self._store = store
        self._sender = sender
        self.endpoints = endpoints
        self._policy = policy
        self._limits = limits
        self._observer = observer
        # Names this process's claims; a claim outlived by its lease is someone else's.
        self._claimer = uuid.uuid4().hex
        self._loops: dict[str, _EndpointLoop] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._abandoning: asyncio.Task[None] | None = None
        self._running = False

    def start(self) -> None:
        self._running = True
        self.endpoints_changed()

    async def stop(self) -> None:
        self._running = False
        await cancel_and_wait(self._abandoning)
        loops, self._loops = list(self._loops.values()), {}
        for loop in loops:
            await loop.stop()
        for task in list(self._stopping):
            await task

    def endpoints_changed(self) -> None:
        """Start a loop for each new endpoint, stop those of removed ones, and make dead the
        deliveries of endpoints the file does not name (kept: retried by hand should the
        endpoint come back under the same name)."""
        if not self._running:
            return
        current = self.endpoints.current
        for name in [name for name in self._loops if name not in current]:
            task = asyncio.create_task(self._loops.pop(name).stop(), name=f"webhooks-end-{name}")
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        for name in current:
            if name not in self._loops:
                self._loops[name] = _EndpointLoop(name, self)
        # The latest change's marking supersedes an earlier one still under way: it reads
        # the endpoints named when it runs.
        if self._abandoning is not None:
            self._abandoning.cancel()
        self._abandoning = asyncio.create_task(self._abandon_unnamed(), name="webhooks-abandon")

    async def _abandon_unnamed(self) -> None:
        """Make dead the deliveries of endpoints the file does not name, once the loops of
        removed ones have stopped (given back what they held), trying again while the
        database is unavailable."""
        if self._stopping:
            await asyncio.wait(list(self._stopping))
        backoff = Backoff(self._limits.poll_interval, 30.0)
        while True:
            try:
                abandoned = await self._store.abandon(
                    list(self.endpoints.current), error=ENDPOINT_REMOVED
                )
            except (StorageUnavailable, StorageConflict):
                logger.warning("webhooks: could not mark the deliveries of removed endpoints")
                await asyncio.sleep(backoff.next_delay())
                continue
            if abandoned:
                logger.warning(
                    "webhooks: %d deliveries dead: the webhooks file no longer names their "
                    "endpoint",
                    abandoned,
                )
            return

    def wake(self, endpoint_names: Collection[str]) -> None:
        """Deliveries for these endpoints were just committed: look for them now."""
        for name in endpoint_names:
            loop = self._loops.get(name)
            if loop is not None:
                loop.wake()

    async def revive(
        self,
        delivery_ids: Collection[int] | None,
        *,
        endpoint: str = "",
        owners: Collection[str] | None = None,
    ) -> int:
        """Send dead deliveries again: those of ``delivery_ids`` (None: every dead one) to
        ``endpoint`` (empty: any) of the current file, of ``owners`` (None: every owner);
        how many."""
        names = [name for name in self.endpoints.current if not endpoint or name == endpoint]
        if not names:
            return 0
        revived = await self._store.revive(delivery_ids, endpoints=names, owners=owners)
        self.wake(names)
        return revived

    @property
    def limits(self) -> DispatchLimits:
        return self._limits

    async def claim(self, name: str, limit: int) -> Claim:
        """Up to ``limit`` due deliveries of endpoint ``name``, claimed, within the slots
        the endpoint's attempts in flight (on every replica) leave."""
        return await self._store.claim(
            name,
            limit,
            concurrency=self._limits.concurrency,
            lease=self._limits.lease,
            claimer=self._claimer,
        )

    async def give_back(self, deliveries: Collection[Delivery]) -> None:
        """Deliveries claimed whose attempts were cut short (a stop): due again now, for
        anyone, instead of once the lease has run out (minutes)."""
        if not deliveries:
            return
        release = self._store.release([delivery.id for delivery in deliveries], self._claimer)
        try:
            # Shielded: called by a task being cancelled, which may be cancelled again.
            await asyncio.shield(release)
        except StorageUnavailable:
            # The lease runs out all the same; only later.
            logger.warning(
                "webhooks: %d claimed deliveries not given back (database unavailable)",
                len(deliveries),
            )

    async def attempt(self, name: str, delivery: Delivery) -> None:
        """Send ``delivery`` to endpoint ``name`` once and record how it went."""
        endpoint = self.endpoints.current.get(name)
        if endpoint is None:
            # Removed meanwhile: the marking that follows the removal makes it dead (held or
            # not), once this loop has stopped.
            return
        started = time.monotonic()
        try:
            # Not asyncio.wait_for: on Python 3.11 it drops a cancellation that arrives as
            # the send ends (see _EndpointLoop._run).
            async with asyncio.timeout(self._limits.timeout):
                problem = await self._sender.send(endpoint, delivery)
        except TimeoutError:
            problem = "timeout"
        seconds = time.monotonic() - started
        if problem is None:
            await self._store.delivered(delivery.id, self._claimer)
            self._observer.webhook_delivered(name, seconds)
            return
        dead = await self._store.failed(
            delivery.id,
            self._claimer,
            error=problem,
            retry=self._policy.after_failure(delivery),
        )
        self._observer.webhook_failed(name, dead=dead)
        if dead:
            logger.warning(
                "webhook %s to %s dead after %d attempts: %s",
                delivery.change.message_id,
                name,
                delivery.attempts + 1,
                problem,
            )


class _EndpointLoop:
    """Claims and sends one endpoint's deliveries, at most ``concurrency`` at a time."""

    def __init__(self, name: str, dispatcher: WebhookDispatcher) -> None:
        self._name = name
        self._dispatcher = dispatcher
        self._woken = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._task = asyncio.create_task(self._run(), name=f"webhooks-{name}")

    def wake(self) -> None:
        self._woken.set()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for task in list(self._in_flight):
            await cancel_and_wait(task)

    async def _run(self) -> None:
        limits = self._dispatcher.limits
        backoff = Backoff(limits.poll_interval, 30.0)
        while True:
            self._woken.clear()
            free = limits.concurrency - len(self._in_flight)
            wait = limits.poll_interval
            if free > 0:
                try:
                    claim = await self._claim(free)
                except StorageUnavailable:
                    logger.warning("webhooks of %s: the database is unavailable", self._name)
                    await asyncio.sleep(backoff.next_delay())
                    continue
                backoff.reset()
                for delivery in claim.deliveries:
                    self._send(delivery)
                if len(claim.deliveries) == free:
                    continue
                if claim.next_due_in is not None:
                    wait = min(wait, max(0.0, claim.next_due_in))
            # Woken by a new delivery, a free slot here, or the next one falling due; a slot
            # another replica frees is seen at the next poll. Not
            # asyncio.wait_for: on Python 3.11 it drops a cancellation that arrives just as
            # the event is set (an attempt ending as the service stops; CPython gh-86296,
            # fixed in 3.12), and this loop would run on while stop() waits for it, forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._woken.wait()

    async def _claim(self, limit: int) -> Claim:
        claiming = asyncio.ensure_future(self._dispatcher.claim(self._name, limit))
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            # Stopped mid-claim: the claim's transaction goes on without this loop and may
            # commit, and its deliveries would wait out the lease. Give them back (should
            # the claim or that fail, the lease is what is left).
            with contextlib.suppress(StorageUnavailable):
                claim = await claiming
                await self._dispatcher.give_back(claim.deliveries)
            raise

    def _send(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._guarded(delivery), name=f"webhook-{delivery.id}")
        self._in_flight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._woken.set()

    async def _guarded(self, delivery: Delivery) -> None:
        try:
            await self._dispatcher.attempt(self._name, delivery)
        except asyncio.CancelledError:
            # Stopped mid-attempt: given back (unless its outcome was recorded first), it is
            # sent again at once rather than after the lease; at least once, as ever.
            await self._dispatcher.give_back([delivery])
            raise
        except StorageUnavailable:
            # The outcome is lost; the lease runs out and the delivery is sent again.
            logger.warning(
                "webhook %s to %s: could not record the outcome (database unavailable)",
                delivery.change.message_id,
                self._name,
            )
