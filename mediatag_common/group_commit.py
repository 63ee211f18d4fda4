"""Group commit: the writes of concurrent requests share one transaction.

Every write transaction costs a hop to a database thread, a wait for the event loop to
resume the caller, and a durable commit (on SQLite, one writer at a time). Committing each
request on its own therefore caps throughput at one transaction per request; committing
whatever queued up while the previous transaction ran amortises it over all of them, and
each request still returns only after its rows are durable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")


class GroupCommit(Generic[Item]):
    """Writes items in groups with ``write(items)``, one transaction per call.

    A failed transaction fails every request in its group with the same error: the groups
    are meant for writes that fail only when the database does.
    """

    def __init__(
        self,
        write: Callable[[Sequence[Item]], Awaitable[None]],
        *,
        max_group: int = 256,
    ) -> None:
        self._write = write
        self._max_group = max_group
        self._queued: list[tuple[Item, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def commit(self, item: Item) -> None:
        """Return once ``item`` is committed; raise what its transaction raised."""
        done = asyncio.get_running_loop().create_future()
        self._queued.append((item, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="group-commit")
        # Shielded: a caller that gives up does not cancel the others' transaction.
        await asyncio.shield(done)

    async def close(self) -> None:
        """Wait for queued items to be written."""
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher

    async def _flush(self) -> None:
        while self._queued:
            group = self._queued[: self._max_group]
            del self._queued[: self._max_group]
            try:
                await self._write([item for item, _ in group])
            except Exception as exc:
                for _, done in group:
                    if not done.done():
                        done.set_exception(exc)
            except BaseException:
                # Cancelled (shutdown): nobody will write the rest either.
                for _, done in [*group, *self._queued]:
                    done.cancel()
                self._queued.clear()
                raise
            else:
                for _, done in group:
                    if not done.done():
                        done.set_result(None)
