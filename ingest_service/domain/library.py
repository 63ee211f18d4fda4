"""Stored media as clients see it: get, list, read the bytes, send back to analysis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from ingest_service.config import UploadLimits
from ingest_service.domain.analysis import AnalysisService
from ingest_service.domain.blobs import BlobStore
from ingest_service.domain.models import Media, ProcessingStatus
from ingest_service.domain.pages import Key, one_page
from ingest_service.domain.store import IngestStore
from ingest_service.domain.uploads import validate_owner_id
from ingest_service.errors import BlobMissing, StorageUnavailable, invalid, media_not_found
from mediatag_common import paging

logger = logging.getLogger(__name__)

MAX_REPROCESS_IDS = 1000
# Ids are UUIDs in their 36-character text form (``Media.stored``): a longer one names
# nothing, and is refused before it reaches a query or a message.
MAX_MEDIA_ID_LENGTH = 36
_REPROCESSABLE = (ProcessingStatus.FAILED, ProcessingStatus.COMPLETED)
# Reads of several items' bytes in one answer (the analysis service's claim check, one call
# per group of jobs): ids per call, bytes per answer, and bytes of answers held at once (an
# answer is held until its call ends: a client that does not read keeps it in memory).
MAX_CONTENT_IDS = 64
MAX_CONTENTS_BYTES = 1024 * 1024
MAX_CONTENTS_BYTES_HELD = 32 * 1024 * 1024


def validate_media_id(media_id: str, field: str = "media_id") -> None:
    """Refuse a missing media id, or one longer than any this service issues."""
    if not media_id:
        raise invalid(field, "MEDIA_ID_REQUIRED", "required")
    if len(media_id) > MAX_MEDIA_ID_LENGTH:
        raise invalid(
            field,
            "MEDIA_ID_TOO_LONG",
            f"{len(media_id)} characters; a media id has at most {MAX_MEDIA_ID_LENGTH}",
        )


@dataclass(frozen=True)
class MediaPage:
    media: tuple[Media, ...]
    next_page_token: str


@dataclass(frozen=True)
class Reprocessed:
    media_ids: tuple[str, ...]


@dataclass(frozen=True)
class Content:
    """One requested item of a batched read: ``media`` None when unknown (or not the
    caller's to see); ``data`` None when it is to be read on its own (``content``)."""

    media_id: str
    media: Media | None
    data: bytes | None


@dataclass(frozen=True)
class Contents:
    """A batched read's items in request order; ``release`` once its answer is sent."""

    items: tuple[Content, ...]
    held_bytes: int


class MediaLibrary:
    """Reads of stored items, and reprocessing through the analysis service."""

    def __init__(
        self,
        *,
        store: IngestStore,
        blobs: BlobStore,
        limits: UploadLimits,
        analysis: AnalysisService,
        page_tokens: paging.PageTokens,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._limits = limits
        self._analysis = analysis
        self._page_tokens = page_tokens
        # Bytes of batched answers not yet sent (see MAX_CONTENTS_BYTES_HELD).
        self.contents_bytes_held = 0

    async def get(self, media_id: str, *, with_embedding: bool) -> Media:
        validate_media_id(media_id)
        found = await self._store.get_media(media_id, with_embedding=with_embedding)
        if found is None:
            raise media_not_found(media_id)
        return found

    async def owners_of(self, media_ids: Sequence[str]) -> dict[str, str]:
        """The owner of each known item of ``media_ids``; unknown ids are left out."""
        return await self._store.media_owners(media_ids)

    async def list_page(
        self,
        *,
        owner_id: str,
        status: ProcessingStatus | None,
        page_size: int,
        page_token: str,
        with_embedding: bool,
    ) -> MediaPage:
        """One page of an owner's items, or of every owner's (``owner_id`` empty), newest
        first (AIP-158 paging). Whether the caller may see every owner is the gRPC layer's
        to decide (an owner-restricted caller's listing is always of one owner)."""
        if owner_id:
            validate_owner_id(owner_id, self._limits)

        async def fetch(after: Key | None, limit: int) -> Sequence[Media]:
            return await self._store.list_media(
                owner_id=owner_id or None,
                status=status,
                after=None if after is None else (float(after[0]), str(after[1])),
                limit=limit,
                with_embedding=with_embedding,
            )

        page, token = await one_page(
            self._page_tokens,
            page_size=page_size,
            page_token=page_token,
            filters={"owner_id": owner_id, "status": status.value if status else ""},
            shape=(float, str),
            fetch=fetch,
            key_of=lambda media: (media.created_at, media.id),
        )
        return MediaPage(page, token)

    async def content(self, media: Media) -> AsyncGenerator[bytes, None]:
        """The stored bytes of ``media`` in chunks, streamed from the blob store."""
        try:
            async for chunk in self._blobs.read(media.sha256):
                yield chunk
        except BlobMissing:
            logger.error(
                "content of media %s (sha256 %s) is missing from the blob store",
                media.id,
                media.sha256,
            )
            raise
        except StorageUnavailable:
            logger.error("content of media %s (sha256 %s) is unreadable", media.id, media.sha256)
            raise

    async def contents(
        self, media_ids: Sequence[str], *, owners: frozenset[str] | None
    ) -> Contents:
        """The bytes of each of ``media_ids`` that fits in one answer, the others' metadata.

        Items of owners outside ``owners`` (None: all) are as unknown. An item goes in while
        the answer stays within MAX_CONTENTS_BYTES and the answers held within
        MAX_CONTENTS_BYTES_HELD; the rest, and items whose blob cannot be read now, are left
        for ``content`` to stream (which says why, if it fails too). The held bytes count
        until ``release``.
        """
        if len(media_ids) > MAX_CONTENT_IDS:
            raise invalid("media_ids", "TOO_MANY_MEDIA_IDS", f"at most {MAX_CONTENT_IDS}")
        for index, media_id in enumerate(media_ids):
            if media_id:  # an empty id is as unknown as any (NOT_FOUND in the answer)
                validate_media_id(media_id, f"media_ids[{index}]")
        found = {
            media.id: media
            for media in await self._store.media_in_order(media_ids)
            if owners is None or media.owner_id in owners
        }
        room = min(MAX_CONTENTS_BYTES, MAX_CONTENTS_BYTES_HELD - self.contents_bytes_held)
        # Counted per id asked for: an id named twice is in the answer twice.
        taken: list[bool] = []
        for media_id in media_ids:
            media = found.get(media_id)
            taken.append(media is not None and media.size_bytes <= room)
            if media is not None and taken[-1]:
                room -= media.size_bytes
        chosen = [media_id for media_id, took in zip(media_ids, taken, strict=True) if took]
        held = sum(found[media_id].size_bytes for media_id in chosen)
        wanted = {media_id: found[media_id] for media_id in chosen}
        self.contents_bytes_held += held
        try:
            read = await asyncio.gather(*(self._whole(media) for media in wanted.values()))
        except BaseException:
            self.release(held)
            raise
        data = dict(zip(wanted, read, strict=True))
        items = tuple(
            Content(media_id, found.get(media_id), data[media_id] if took else None)
            for media_id, took in zip(media_ids, taken, strict=True)
        )
        return Contents(items, held)

    def release(self, held_bytes: int) -> None:
        """A batched answer was sent (or its call ended): its bytes are no longer held."""
        self.contents_bytes_held -= held_bytes

    async def _whole(self, media: Media) -> bytes | None:
        """All of a small item's bytes; None if its blob cannot be read now, or holds more
        than the item's size (the stream says what is wrong)."""
        chunks: list[bytes] = []
        received = 0
        try:
            async for chunk in self._blobs.read(media.sha256):
                received += len(chunk)
                if received > media.size_bytes:
                    return None
                chunks.append(chunk)
        except (StorageUnavailable, BlobMissing):
            return None
        return b"".join(chunks)

    async def reprocess(
        self, media_ids: Sequence[str], *, owner_id: str, status: ProcessingStatus | None
    ) -> Reprocessed:
        """Send FAILED (or COMPLETED) items back to analysis with the analysis service's
        ``RetryJobs``, by ids or by owner and status.

        Listed items still waiting in the outbox, or not analysed at all (video), are left
        out: they have nothing to redo.
        """
        if status is not None and status not in _REPROCESSABLE:
            raise invalid("status", "INVALID_STATUS", "only FAILED or COMPLETED can be reprocessed")
        if owner_id:
            validate_owner_id(owner_id, self._limits)
        if not media_ids and not owner_id and status is None:
            raise invalid("media_ids", "FILTER_REQUIRED", "name media_ids, or an owner_id/status")
        if len(media_ids) > MAX_REPROCESS_IDS:
            raise invalid("media_ids", "TOO_MANY_MEDIA_IDS", f"at most {MAX_REPROCESS_IDS}")
        eligible: list[str] = []
        if media_ids:
            eligible = await self._eligible(media_ids)
            if not eligible:
                return Reprocessed(())
        retried = await self._analysis.retry_jobs(eligible, owner_id=owner_id, status=status)
        logger.info(
            "sent %d media back to analysis: %s", len(retried), ", ".join(retried) or "none"
        )
        return Reprocessed(retried)

    async def _eligible(self, media_ids: Sequence[str]) -> list[str]:
        for index, media_id in enumerate(media_ids):
            validate_media_id(media_id, f"media_ids[{index}]")
        states = await self._store.analysis_states(media_ids)
        for index, media_id in enumerate(media_ids):
            if media_id not in states:
                raise media_not_found(media_id, field=f"media_ids[{index}]")
        return [
            media_id
            for media_id in dict.fromkeys(media_ids)
            if states[media_id].status is not ProcessingStatus.NOT_APPLICABLE
            and not states[media_id].in_outbox
        ]
