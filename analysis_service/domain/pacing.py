"""Delivery pacing: the workers' commits take turns with the watch fan-out.

Sending one status change to a thousand streams keeps the event loop busy for tens of
milliseconds, and a change committed meanwhile queues behind it. A worker's completion and
its next claim come milliseconds apart, and workers that wait on one busy loop fall into
step: unpaced, changes came in bursts (half the gaps between them under 10 ms) and each
waited out the fan-out of those before it. Paced, a commit that publishes waits until the
watchers have taken what was published before it and no other such commit is running, so
each change finds the loop free. The workers lose no throughput: their analyses run on
while they wait, and the wait is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable


class DeliveryPacer:
    """Turns for commits that publish status changes, one at a time, each once the watchers
    have taken the changes before it (``is_delivered``) or after ``max_wait`` seconds."""

    def __init__(self, is_delivered: Callable[[], bool]) -> None:
        self._is_delivered = is_delivered
        self._held = False
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    @contextlib.asynccontextmanager
    async def turn(self, max_wait: float) -> AsyncIterator[None]:
        """Run the block in turn; after ``max_wait`` seconds of waiting, out of turn."""
        held = await self._take(max_wait)
        try:
            yield
        finally:
            if held:
                self._held = False
                self.pass_turn()

    def pass_turn(self) -> None:
        """Give the turn to the longest waiting commit, if it is free and due. Called when a
        turn ends and when the watchers may have taken what was published."""
        while self._waiting and not self._held and self._is_delivered():
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                self._held = True

    async def _take(self, max_wait: float) -> bool:
        """Wait for the turn; True when this caller holds it, False when time ran out."""
        if not self._held and not self._waiting and self._is_delivered():
            self._held = True
            return True
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            async with asyncio.timeout(max_wait):
                await turn
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                # Given the turn as the caller was cancelled: pass it on.
                self._held = False
                self.pass_turn()
            raise
        finally:
            # Usually popped by pass_turn already (a failed deque.remove formats the future's
            # repr for its message: a cost on every paced commit).
            if turn in self._waiting:
                self._waiting.remove(turn)
        # A turn given as the time ran out is this caller's all the same.
        return turn.done() and not turn.cancelled()
