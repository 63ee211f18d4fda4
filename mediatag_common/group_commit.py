"""Group commit: the writes of concurrent requests share one transaction.

Every transaction costs round trips (a thread hop, begin, statements, commit; on
PostgreSQL a network round trip each) and, for the analysis queue, a turn at the revision
counter's lock. Committing each request on its own caps throughput at one transaction per
request; committing whatever queued up while the previous transaction ran amortises it over
all of them, and each request still returns only after its rows are durable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCommit(Generic[Item, Result]):
    """Writes queued items with ``write_group(items)``, one call at a time; it returns one
    result per item, in order.

    A failed call fails every request of its group with the same error: per-item outcomes
    (a fenced-out completion, say) belong in the results.
    """

    def __init__(
        self,
        write_group: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        *,
        max_group: int = 256,
    ) -> None:
        self._write_group = write_group
        self._max_group = max_group
        self._queued: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def enqueue(self, item: Item) -> asyncio.Future[Result]:
        """Queue ``item``; the future holds its result once its group is committed. The
        write goes on if the caller stops waiting for it."""
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queued.append((item, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="group-commit")
        return done

    async def commit(self, item: Item) -> Result:
        """Return once ``item`` is committed; raise what its transaction raised."""
        # Shielded: a caller that gives up does not cancel the others' transaction.
        return await asyncio.shield(self.enqueue(item))

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
                results = await self._write_group([item for item, _ in group])
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
                for (_, done), result in zip(group, results, strict=True):
                    if not done.done():
                        done.set_result(result)
