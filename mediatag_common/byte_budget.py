"""Bytes of request messages held at once, shared fairly by the callers that wait for them.

A semaphore counted in bytes. When there is no room, a call waits; when room comes back, the
callers that wait take turns, one call each (services' calls before clients'), each caller's
calls in the order they came: a client with a thousand calls waiting does not put another
client's one call behind them all. The places to wait are bounded as watch streams are
(:class:`~mediatag_common.caller_slots.CallerSlots`): clients share ``max_waiters`` of them,
one caller holding at most ``max_waiters_per_caller``, and each service has ``max_waiters`` of
its own; a call beyond is refused (:class:`TooManyWaiting`).
"""

from __future__ import annotations

import asyncio
import collections

from mediatag_common.caller_slots import CallerSlots, SlotsFull
from mediatag_common.callers import Caller

_Waiter = tuple[int, "asyncio.Future[None]"]


class TooManyWaiting(Exception):
    """A :class:`ByteBudget` has as many waiters as it may: of all clients, of the caller
    (``bound`` says which), ``limit`` of them."""

    def __init__(self, bound: SlotsFull, limit: int) -> None:
        super().__init__(f"{limit} calls wait already ({bound.value})")
        self.bound = bound
        self.limit = limit


class ByteBudget:
    """At most ``total`` bytes held at once; one amount is always admitted when nothing is
    held, however large."""

    def __init__(
        self, total: int, *, max_waiters: int, max_waiters_per_caller: int | None = None
    ) -> None:
        self.total = total
        self.used = 0
        self._places = CallerSlots(
            clients=max_waiters, per_caller=max_waiters_per_caller, per_service=max_waiters
        )
        # The callers with calls waiting, in turn order (a dict keeps the order callers were
        # put in): services apart, served first.
        self._services: dict[Caller, collections.deque[_Waiter]] = {}
        self._clients: dict[Caller, collections.deque[_Waiter]] = {}

    @property
    def waiting(self) -> bool:
        return bool(self._services or self._clients)

    @property
    def waiting_calls(self) -> int:
        """Calls holding a place to wait (one admitted gives its place back as it resumes)."""
        return self._places.taken

    def _fits(self, amount: int) -> bool:
        return self.used == 0 or self.used + amount <= self.total

    async def acquire(self, amount: int, caller: Caller) -> None:
        """Hold ``amount`` bytes, waiting for room in ``caller``'s turn; raises
        :class:`TooManyWaiting` at once when no place to wait is left."""
        if not self.waiting and self._fits(amount):
            self.used += amount
            return
        full = self._places.take(caller)
        if full is not None:
            raise TooManyWaiting(full, self._places.limit(full))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, waiter)
        turns = self._services if caller.service else self._clients
        turns.setdefault(caller, collections.deque()).append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(amount)  # granted just as the wait was cancelled
            else:
                self._forget(turns, caller, entry)
                # It may have kept calls behind it that fit: they go now, not at the next
                # release (which a slow call holding the room may make wait).
                self.release(0)
            raise
        finally:
            self._places.give_back(caller)

    def release(self, amount: int) -> None:
        """Give back ``amount`` bytes, and admit the waiting calls that now fit, in turn."""
        self.used -= amount
        while True:
            turns = self._services or self._clients
            if not turns:
                return
            caller, queue = next(iter(turns.items()))
            amount, waiter = queue[0]
            if not self._fits(amount):
                return
            queue.popleft()
            # The caller's next call, if any, waits for the caller's next turn: at the end.
            del turns[caller]
            if queue:
                turns[caller] = queue
            if not waiter.done():  # a cancelled wait leaves with its task's next step
                self.used += amount
                waiter.set_result(None)

    @staticmethod
    def _forget(
        turns: dict[Caller, collections.deque[_Waiter]], caller: Caller, entry: _Waiter
    ) -> None:
        queue = turns.get(caller)
        if queue is None or entry not in queue:
            return  # already taken off by release(), which skipped it as cancelled
        queue.remove(entry)
        if not queue:
            del turns[caller]
