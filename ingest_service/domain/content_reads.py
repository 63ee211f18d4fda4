"""Streamed reads of an item's bytes (``ReadMediaContent``), bounded.

Each read holds an open blob (a file descriptor, or a bucket's response) and a call for as
long as its client takes the chunks, so a client that opens reads and takes nothing could
hold descriptors and calls until none is left. Reads are therefore shared out like upload
streams (:class:`~mediatag_common.caller_slots.CallerSlots`): clients share ``max_reads``,
one caller at most its share, and each service token (the analysis service reading jobs'
bytes) has ``max_reads`` of its own, so clients never keep analysis waiting. A read whose
client has taken nothing for the idle timeout is ended: ``on_stall`` is told, and the caller
ends the call, which closes the blob and gives the slot back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable

from ingest_service.config import ContentReadLimits
from ingest_service.domain.library import MediaLibrary
from ingest_service.domain.models import Media
from ingest_service.errors import ContentReadStalled, TooManyContentReads
from mediatag_common.caller_slots import CallerSlots, SlotsFull
from mediatag_common.callers import Caller

logger = logging.getLogger(__name__)


class ContentReads:
    """Hands out the bytes of items, one bounded read at a time."""

    def __init__(self, *, library: MediaLibrary, limits: ContentReadLimits) -> None:
        self._library = library
        self._idle_timeout = limits.idle_timeout
        self._slots = CallerSlots(
            clients=limits.max_reads,
            per_caller=limits.max_reads_per_caller,
            per_service=limits.max_reads,
        )

    @property
    def open_reads(self) -> int:
        """Reads holding a slot now, clients' and services'."""
        return self._slots.taken

    async def chunks(
        self, media: Media, caller: Caller, on_stall: Callable[[ContentReadStalled], None]
    ) -> AsyncGenerator[bytes, None]:
        """The bytes of ``media`` for ``caller``, in chunks.

        Refused at once (TOO_MANY_CONTENT_READS) when every slot, or ``caller``'s share, is
        taken. When a chunk has not been taken ``idle_timeout`` seconds after it was handed
        on, ``on_stall`` is called with the refusal: the caller must end the read (close
        this iterator), which closes the blob and frees the slot.
        """
        full = self._slots.take(caller)
        if full is not None:
            raise _too_many_reads(full, self._slots.limit(full))
        loop = asyncio.get_running_loop()
        try:
            async with contextlib.aclosing(self._library.content(media)) as chunks:
                async for chunk in chunks:
                    # Resumed only once the chunk is sent: the client has taken it.
                    timer = loop.call_later(self._idle_timeout, self._stalled, media, on_stall)
                    try:
                        yield chunk
                    finally:
                        timer.cancel()
        finally:
            self._slots.give_back(caller)

    def _stalled(self, media: Media, on_stall: Callable[[ContentReadStalled], None]) -> None:
        logger.info(
            "ended a read of media %s: its client took nothing for %g s",
            media.id,
            self._idle_timeout,
        )
        on_stall(
            ContentReadStalled(
                f"nothing was taken for {self._idle_timeout:g} s; read again from the start",
                metadata={"idleTimeoutSeconds": f"{self._idle_timeout:g}"},
            )
        )


def _too_many_reads(full: SlotsFull, limit: int) -> TooManyContentReads:
    if full is SlotsFull.CALLER:
        return TooManyContentReads(
            f"at most {limit} ReadMediaContent calls of one caller at once; finish one first",
            reason="TOO_MANY_CONTENT_READS_FOR_CALLER",
            metadata={"maxContentReadsPerCaller": str(limit)},
        )
    if full is SlotsFull.SERVICE:
        return TooManyContentReads(
            f"at most {limit} ReadMediaContent calls of a service at once",
            metadata={"maxServiceContentReads": str(limit)},
        )
    return TooManyContentReads(
        f"at most {limit} ReadMediaContent calls at once; retry with backoff",
        metadata={"maxContentReads": str(limit)},
    )
