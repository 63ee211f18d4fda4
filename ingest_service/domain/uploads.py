"""The upload use case: validate, sniff, store bytes, commit rows and outbox, answer.

A batch is all or nothing: every file is validated and sniffed before anything is stored,
and the media rows and their outbox rows commit in one transaction before the answer.
The answer never waits for the analysis service; the outbox forwarder is woken instead.
An upload with a request id is recorded in the same transaction (see ``requests``).
Streamed uploads (``stream_upload``) store their file their own way and commit here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from ingest_service.config import UploadLimits
from ingest_service.domain.blobs import BlobStore, Placement
from ingest_service.domain.models import (
    Media,
    ProcessingStatus,
    RequestRecord,
    SniffedMedia,
    UploadFile,
    UploadRequest,
    UploadResult,
)
from ingest_service.domain.requests import RequestIds, parse_request_id, upload_digest
from ingest_service.domain.sniff import sniff
from ingest_service.domain.store import IngestStore, NewUpload
from ingest_service.errors import invalid
from mediatag_common.group_commit import GroupCommit
from mediatag_common.untrusted_text import has_unsafe_characters

logger = logging.getLogger(__name__)

OWNER_ID_CHARACTERS = "A-Za-z0-9._:@-"
MAX_CONTEXT_KEY_LENGTH = 128
NO_UNSAFE_CHARACTERS = "no control characters or bidirectional overrides"


def validate_owner_id(owner_id: str, limits: UploadLimits, field: str = "owner_id") -> None:
    """Refuse a missing owner id, or one outside ``[A-Za-z0-9._:@-]{1,max}``."""
    if not owner_id:
        raise invalid(field, "OWNER_ID_REQUIRED", "required")
    pattern = rf"[{OWNER_ID_CHARACTERS}]{{1,{limits.max_owner_id_length}}}"
    if not re.fullmatch(pattern, owner_id):
        raise invalid(
            field,
            "INVALID_OWNER_ID",
            f"must be 1-{limits.max_owner_id_length} of the characters {OWNER_ID_CHARACTERS}",
        )


def validate_metadata(
    *,
    owner_id: str,
    category: str,
    context: Mapping[str, str],
    limits: UploadLimits,
    prefix: str = "",
) -> None:
    """Owner, category and context of an upload; fields are named with ``prefix``."""
    validate_owner_id(owner_id, limits, f"{prefix}owner_id")
    if len(category) > limits.max_category_length or has_unsafe_characters(category):
        raise invalid(
            f"{prefix}category",
            "INVALID_CATEGORY",
            f"at most {limits.max_category_length} characters, {NO_UNSAFE_CHARACTERS}",
        )
    _validate_context(context, limits, f"{prefix}context")


def validate_filename(filename: str, limits: UploadLimits, field: str) -> None:
    if len(filename) > limits.max_filename_length or has_unsafe_characters(filename):
        raise invalid(
            field,
            "INVALID_FILENAME",
            f"at most {limits.max_filename_length} characters, {NO_UNSAFE_CHARACTERS}",
        )


def validate_request(request: UploadRequest, limits: UploadLimits) -> None:
    """Everything about a batch that can be judged without looking into the bytes."""
    validate_metadata(
        owner_id=request.owner_id,
        category=request.category,
        context=request.context,
        limits=limits,
    )
    if not request.files:
        raise invalid("files", "NO_FILES", "an upload needs at least one file")
    if len(request.files) > limits.max_files:
        raise invalid(
            "files",
            "TOO_MANY_FILES",
            f"{len(request.files)} files; at most {limits.max_files} per upload",
        )
    largest = limits.largest_file_bytes
    for index, file in enumerate(request.files):
        validate_filename(file.filename, limits, f"files[{index}].filename")
        if not file.content:
            raise invalid(f"files[{index}].content", "EMPTY_FILE", "the file is empty")
        if len(file.content) > largest:
            raise invalid(
                f"files[{index}].content",
                "FILE_TOO_LARGE",
                f"{len(file.content)} bytes; a file may have at most {largest}",
            )


def _validate_context(context: Mapping[str, str], limits: UploadLimits, field: str) -> None:
    if len(context) > limits.max_context_entries:
        raise invalid(field, "INVALID_CONTEXT", f"at most {limits.max_context_entries} entries")
    for key, value in context.items():
        if not key or len(key) > MAX_CONTEXT_KEY_LENGTH or has_unsafe_characters(key):
            raise invalid(
                field,
                "INVALID_CONTEXT",
                f"key {key[:40]!r}: 1-{MAX_CONTEXT_KEY_LENGTH} characters, {NO_UNSAFE_CHARACTERS}",
            )
        if len(value) > limits.max_context_value_length:
            raise invalid(
                field,
                "INVALID_CONTEXT",
                f"value of {key!r}: at most {limits.max_context_value_length} characters",
            )


def upload_message(count: int, analysed: int) -> str:
    return (
        f"Uploaded {count} media file(s). {analysed} image(s) are being analyzed in the background."
    )


@dataclass
class _PendingUpload:
    """The rows of one upload on their way into a group commit."""

    rows: NewUpload
    # Set by the commit when another call recorded the same request id first.
    prior: RequestRecord | None = None


class Uploads:
    """Stores uploaded batches and queues their analysis through the outbox."""

    def __init__(
        self,
        *,
        store: IngestStore,
        blobs: BlobStore,
        limits: UploadLimits,
        requests: RequestIds,
        on_committed: Callable[[], None],
        blob_grace_period: float,
    ) -> None:
        self._blobs = blobs
        self._blob_grace_period = blob_grace_period
        self._limits = limits
        self._requests = requests
        self._on_committed = on_committed
        self._store = store
        self._commits: GroupCommit[_PendingUpload, None] = GroupCommit(self._insert_group)

    async def upload(self, request: UploadRequest) -> UploadResult:
        """Store every file of ``request`` or none; raises IngestError on a bad item.

        With a request id, a repeated request is answered with its first answer instead.
        """
        validate_request(request, self._limits)
        request_id = parse_request_id(request.request_id, "request_id")
        if not request_id:
            return await self._store_files(request, digests=None, record=None)
        digests = await asyncio.gather(
            *(asyncio.to_thread(_sha256, file.content) for file in request.files)
        )
        digest = upload_digest(
            method="UploadMedia",
            owner_id=request.owner_id,
            category=request.category,
            context=request.context,
            priority=request.priority,
            files=[
                (file.filename, file.declared_content_type, sha256)
                for file, sha256 in zip(request.files, digests, strict=True)
            ],
        )
        async with self._requests.claim(request_id):
            prior = await self._requests.lookup(request_id)
            if prior is not None:
                return UploadResult(*await self._requests.replay(prior, digest, "request_id"))
            record = RequestRecord(request_id, digest, (), "", 0.0)
            return await self._store_files(request, digests=digests, record=record)

    async def commit(
        self, items: tuple[Media, ...], record: RequestRecord | None, *, request_id_field: str
    ) -> UploadResult:
        """Commit the rows of stored ``items`` (and ``record``), then answer.

        ``record`` is completed here with the items and the message. When another process
        recorded the same request id first, its answer (or refusal) is returned instead.
        """
        analysed = sum(item.status is ProcessingStatus.PENDING for item in items)
        message = upload_message(len(items), analysed)
        if record is not None:
            record = dataclasses.replace(
                record,
                media_ids=tuple(item.id for item in items),
                message=message,
                created_at=time.time(),
            )
        pending = _PendingUpload(NewUpload(items, record))
        await self._commits.commit(pending)
        if pending.prior is not None and record is not None:
            return UploadResult(
                *await self._requests.replay(pending.prior, record.digest, request_id_field)
            )
        return UploadResult(items, message)

    async def keep_blob(
        self, sha256: str, placement: Placement, store_again: Callable[[], Awaitable[Placement]]
    ) -> None:
        """After the rows naming ``sha256`` committed: store it again if the sweep took it.

        Only a blob the sweep may have judged an orphan is looked for (see ``blobs``).
        """
        if placement.may_be_swept(self._blob_grace_period) and not await self._blobs.contains(
            sha256
        ):
            logger.warning("blob %s was swept as its row committed; storing it again", sha256)
            await store_again()

    async def close(self) -> None:
        """Wait for uploads being committed."""
        await self._commits.close()

    async def _store_files(
        self,
        request: UploadRequest,
        *,
        digests: Sequence[str] | None,
        record: RequestRecord | None,
    ) -> UploadResult:
        # Every file is judged before any is stored: a bad one rejects the batch untouched.
        sniffed = await asyncio.to_thread(self._sniff_all, request.files)
        # The files are independent: their hashing and writes (two fsyncs each) overlap.
        if digests is None:
            digests = await asyncio.gather(
                *(asyncio.to_thread(_sha256, file.content) for file in request.files)
            )
        # Every put ends before the answer, also when one failed: a refusal leaves nothing
        # being written behind it.
        stored = await asyncio.gather(
            *(
                self._blobs.put(sha256, file.content)
                for file, sha256 in zip(request.files, digests, strict=True)
            ),
            return_exceptions=True,
        )
        placements: list[Placement] = []
        for outcome in stored:
            if isinstance(outcome, BaseException):
                raise outcome
            placements.append(outcome)
        now = time.time()
        items = tuple(
            Media.stored(
                owner_id=request.owner_id,
                category=request.category,
                context=request.context,
                filename=file.filename,
                priority=request.priority,
                found=found,
                size_bytes=len(file.content),
                sha256=sha256,
                now=now,
            )
            for file, found, sha256 in zip(request.files, sniffed, digests, strict=True)
        )
        result = await self.commit(items, record, request_id_field="request_id")
        if result.media is items:
            await asyncio.gather(
                *(
                    self.keep_blob(sha256, placement, self._storing(sha256, file.content))
                    for file, sha256, placement in zip(
                        request.files, digests, placements, strict=True
                    )
                )
            )
            for item, file in zip(items, request.files, strict=True):
                log_stored(item, file.declared_content_type)
        return result

    def _storing(self, sha256: str, content: bytes) -> Callable[[], Awaitable[Placement]]:
        return lambda: self._blobs.put(sha256, content)

    async def _insert_group(self, uploads: Sequence[_PendingUpload]) -> list[None]:
        await self._insert(uploads)
        return [None] * len(uploads)

    async def _insert(self, uploads: Sequence[_PendingUpload]) -> None:
        """The rows of ``uploads`` and the outbox rows of their images, in one transaction.

        An upload whose request id is already recorded (by another process, or earlier in
        this group) stores nothing: it is answered from the record.
        """
        priors = await self._store.commit_uploads(
            [upload.rows for upload in uploads],
            requests_expire_before=self._requests.cutoff(),
        )
        analysed = False
        for upload, prior in zip(uploads, priors, strict=True):
            upload.prior = prior
            if prior is None:
                analysed |= any(
                    item.status is ProcessingStatus.PENDING for item in upload.rows.items
                )
        if analysed:
            self._on_committed()

    def _sniff_all(self, files: Sequence[UploadFile]) -> list[SniffedMedia]:
        return [
            sniff(file.content, index=index, limits=self._limits)
            for index, file in enumerate(files)
        ]


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def log_stored(item: Media, declared_content_type: str) -> None:
    """One line per stored item: what it is, what the client claimed, where it goes."""
    status = item.status.value
    if item.not_applicable_reason:
        status = f"{status} ({item.not_applicable_reason})"
    declared = ""
    if declared_content_type and declared_content_type != item.content_type:
        declared = f" (declared {declared_content_type!r})"
    logger.info(
        "stored media %s: %r, %s%s, %d bytes, owner %s -> %s",
        item.id,
        item.filename,
        item.content_type,
        declared,
        item.size_bytes,
        item.owner_id,
        status,
    )
