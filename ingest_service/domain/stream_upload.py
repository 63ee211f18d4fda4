"""Streamed uploads (``UploadMediaStream``): one file, a header first, then its content.

The content goes to the blob store as it arrives (a temp file, or a multipart upload to a
temporary object beside a local spool file), hashed on the way, in batches of about
:data:`WRITE_BATCH_BYTES`: however large the file, the service holds one batch (and, for a
bucket, one part) and the message gRPC is delivering, so memory stays flat. The kind of file
is known from its first bytes, so a file over its kind's limit (or over the size its header
declared) is refused as soon as the running total passes it, without reading the rest.
Once the stream ends, the file is checked like an ``UploadMedia`` file (the same sniffing,
against the file mapped into memory rather than read into it), verified against the
header's SHA-256, stored under its digest, and committed through the same group commit and
outbox as every upload. Whatever ends the call before that (a refusal, the client
cancelling, the connection breaking, a stall, the store failing) removes the partial upload:
no blob, no temporary copy, no row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from ingest_service.config import StreamLimits, UploadLimits
from ingest_service.domain.blobs import BlobStore, ReceivedBlob
from ingest_service.domain.models import (
    Media,
    RequestRecord,
    SniffedMedia,
    StreamHeader,
    UploadResult,
)
from ingest_service.domain.requests import RequestIds, parse_request_id, upload_digest
from ingest_service.domain.sniff import VIDEO_SIGNATURE_BYTES, sniff, sniff_video
from ingest_service.domain.stream_pace import StreamPace
from ingest_service.domain.uploads import (
    Uploads,
    log_stored,
    validate_filename,
    validate_metadata,
)
from ingest_service.errors import StorageUnavailable, TooManyUploadStreams, invalid
from mediatag_common.caller_slots import CallerSlots, SlotsFull
from mediatag_common.callers import ANONYMOUS, Caller

logger = logging.getLogger(__name__)

# Content is written (and hashed) once this much has arrived: large enough that the hop to
# a thread is rare, small enough to keep memory flat.
WRITE_BATCH_BYTES = 1024 * 1024
# Field that content refusals name: the stream's content arrives in ``chunk`` messages.
CONTENT_FIELD = "chunk"
REQUEST_ID_FIELD = "header.request_id"
_SHA256 = re.compile(r"[0-9a-f]{64}")

StreamPart = StreamHeader | bytes


class StreamUploads:
    """Receives streamed uploads to disk and stores them like ``UploadMedia`` files."""

    def __init__(
        self,
        *,
        uploads: Uploads,
        blobs: BlobStore,
        requests: RequestIds,
        limits: UploadLimits,
        stream_limits: StreamLimits,
    ) -> None:
        self._uploads = uploads
        self._blobs = blobs
        self._requests = requests
        self._limits = limits
        self._stream_limits = stream_limits
        # Each stream holds a temp file (a descriptor) and a message: a slot each.
        self._slots = CallerSlots(
            clients=stream_limits.max_streams,
            per_caller=stream_limits.max_streams_per_caller,
            per_service=stream_limits.max_streams,
        )
        # Removals of partial uploads still running after their call was cancelled.
        self._discards: set[asyncio.Task[Any]] = set()

    async def upload(
        self, parts: AsyncIterator[StreamPart], caller: Caller = ANONYMOUS
    ) -> UploadResult:
        """Store the one file ``parts`` carry (a header, then chunks); raises IngestError.

        Refused at once (TOO_MANY_UPLOAD_STREAMS) when every stream slot, or ``caller``'s
        share of them, is taken.
        """
        full = self._slots.take(caller)
        if full is not None:
            raise _too_many_streams(full, self._slots.limit(full))
        try:
            pace = StreamPace(self._stream_limits, asyncio.get_running_loop().time())
            return await self._upload(parts, pace)
        finally:
            self._slots.give_back(caller)

    async def _upload(self, parts: AsyncIterator[StreamPart], pace: StreamPace) -> UploadResult:
        header = self._validated(await self._next(parts, pace))
        request_id = parse_request_id(header.request_id, REQUEST_ID_FIELD)
        if request_id and header.sha256:
            # The content is declared, so a retry is answered before its bytes are read.
            prior = await self._requests.lookup(request_id)
            if prior is not None:
                digest = _digest(header, header.sha256)
                return UploadResult(*await self._requests.replay(prior, digest, REQUEST_ID_FIELD))
        incoming = await self._blobs.receive()
        try:
            await self._receive(parts, pace, header, incoming)
            sha256 = await incoming.finish()
            if header.sha256 and sha256 != header.sha256:
                raise invalid(
                    "header.sha256",
                    "CHECKSUM_MISMATCH",
                    f"the content's SHA-256 is {sha256}, not the declared {header.sha256}",
                )
            found = await asyncio.to_thread(self._sniff, incoming)
            if not request_id:
                return await self._store(header, incoming, sha256, found, None)
            digest = _digest(header, sha256)
            async with self._requests.claim(request_id):
                prior = await self._requests.lookup(request_id)
                if prior is not None:
                    replayed = await self._requests.replay(prior, digest, REQUEST_ID_FIELD)
                    return UploadResult(*replayed)
                record = RequestRecord(request_id, digest, (), "", 0.0)
                return await self._store(header, incoming, sha256, found, record)
        finally:
            await self._discard(incoming)

    async def close(self) -> None:
        """Wait for the removal of partial uploads whose calls were cancelled."""
        await asyncio.gather(*self._discards, return_exceptions=True)

    async def _discard(self, incoming: ReceivedBlob) -> None:
        """Remove what is temporary of ``incoming``; runs to its end, also when the call is
        cancelled (again) meanwhile."""
        discard = asyncio.create_task(incoming.discard(), name="discard-partial-upload")
        self._discards.add(discard)
        discard.add_done_callback(self._discards.discard)
        try:
            await asyncio.shield(discard)
        except StorageUnavailable:
            logger.warning("could not remove a partial upload's temporary copy")

    def _validated(self, first: StreamPart | None) -> StreamHeader:
        if not isinstance(first, StreamHeader):
            raise invalid("header", "HEADER_REQUIRED", "the first message must be the header")
        limits = self._limits
        validate_metadata(
            owner_id=first.owner_id,
            category=first.category,
            context=first.context,
            limits=limits,
            prefix="header.",
        )
        validate_filename(first.filename, limits, "header.filename")
        if first.size_bytes < 0:
            raise invalid("header.size_bytes", "INVALID_SIZE", "must not be negative")
        self._check_declared_size(first, limits.largest_file_bytes)
        sha256 = first.sha256.lower()
        if sha256 and not _SHA256.fullmatch(sha256):
            raise invalid("header.sha256", "INVALID_SHA256", "must be 64 hex digits")
        return dataclasses.replace(first, sha256=sha256)

    async def _receive(
        self,
        parts: AsyncIterator[StreamPart],
        pace: StreamPace,
        header: StreamHeader,
        incoming: ReceivedBlob,
    ) -> None:
        """Write the chunks to ``incoming``, refusing as soon as a size limit is passed."""
        limit = self._limits.largest_file_bytes
        head = b""
        total = 0
        batch: list[bytes] = []
        batched = 0
        while (part := await self._next(parts, pace)) is not None:
            if isinstance(part, StreamHeader):
                raise invalid("header", "HEADER_REPEATED", "only the first message is a header")
            if not part:
                continue
            total += len(part)
            if len(head) < VIDEO_SIGNATURE_BYTES:
                head += part[: VIDEO_SIGNATURE_BYTES - len(head)]
                if len(head) == VIDEO_SIGNATURE_BYTES:
                    limit = self._limit_for(head, header)
            self._check_size(total, limit, header)
            batch.append(part)
            batched += len(part)
            if batched >= WRITE_BATCH_BYTES:
                await incoming.write(batch)
                batch, batched = [], 0
        if batch:
            await incoming.write(batch)
        if total == 0:
            raise invalid(CONTENT_FIELD, "EMPTY_FILE", "the file is empty")
        self._check_size(total, self._limit_for(head, header), header)
        if header.size_bytes and total != header.size_bytes:
            raise invalid(
                "header.size_bytes",
                "SIZE_MISMATCH",
                f"the stream ended after {total} of the {header.size_bytes} bytes declared",
            )

    def _limit_for(self, head: bytes, header: StreamHeader) -> int:
        """The size limit of the file that starts with ``head``; checks the declared size."""
        is_video = sniff_video(head) is not None
        limit = self._limits.max_video_bytes if is_video else self._limits.max_image_bytes
        self._check_declared_size(header, limit)
        return limit

    @staticmethod
    def _check_declared_size(header: StreamHeader, limit: int) -> None:
        if header.size_bytes > limit:
            raise invalid(
                "header.size_bytes",
                "FILE_TOO_LARGE",
                f"{header.size_bytes} bytes declared; this file may have at most {limit}",
            )

    @staticmethod
    def _check_size(total: int, limit: int, header: StreamHeader) -> None:
        if header.size_bytes and total > header.size_bytes:
            raise invalid(
                "header.size_bytes",
                "SIZE_MISMATCH",
                f"more than the {header.size_bytes} bytes declared",
            )
        if total > limit:
            raise invalid(
                CONTENT_FIELD,
                "FILE_TOO_LARGE",
                f"over {limit} bytes; this file may have at most {limit}",
            )

    def _sniff(self, incoming: ReceivedBlob) -> SniffedMedia:
        try:
            content = incoming.mapped()
        except OSError as exc:
            raise StorageUnavailable("the received upload cannot be read back") from exc
        with content:
            return sniff(content, field=CONTENT_FIELD, limits=self._limits)

    async def _store(
        self,
        header: StreamHeader,
        incoming: ReceivedBlob,
        sha256: str,
        found: SniffedMedia,
        record: RequestRecord | None,
    ) -> UploadResult:
        placement = await incoming.store(sha256)
        now = time.time()
        item = Media.stored(
            owner_id=header.owner_id,
            category=header.category,
            context=header.context,
            filename=header.filename,
            priority=header.priority,
            found=found,
            size_bytes=incoming.size,
            sha256=sha256,
            now=now,
        )
        result = await self._uploads.commit((item,), record, request_id_field=REQUEST_ID_FIELD)
        if result.media[0] is item:
            await self._uploads.keep_blob(sha256, placement, lambda: incoming.store(sha256))
            log_stored(item, header.declared_content_type)
        return result

    async def _next(self, parts: AsyncIterator[StreamPart], pace: StreamPace) -> StreamPart | None:
        """The next message, None at the end; a client silent or slow for too long is refused."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(pace.deadline()):
                part = await anext(parts, None)
        except TimeoutError as exc:
            raise pace.refusal(loop.time()) from exc
        pace.received(len(part) if isinstance(part, bytes) else 0, loop.time())
        return part


def _digest(header: StreamHeader, sha256: str) -> str:
    return upload_digest(
        method="UploadMediaStream",
        owner_id=header.owner_id,
        category=header.category,
        context=header.context,
        priority=header.priority,
        files=[(header.filename, header.declared_content_type, sha256)],
    )


def _too_many_streams(full: SlotsFull, limit: int) -> TooManyUploadStreams:
    if full is SlotsFull.CALLER:
        return TooManyUploadStreams(
            f"at most {limit} upload streams of one caller at once; UploadMedia is not limited so",
            reason="TOO_MANY_UPLOAD_STREAMS_FOR_CALLER",
            metadata={"maxUploadStreamsPerCaller": str(limit)},
        )
    return TooManyUploadStreams(
        f"at most {limit} upload streams at once; retry with backoff, or use UploadMedia",
        metadata={"maxUploadStreams": str(limit)},
    )
