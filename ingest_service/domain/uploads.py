"""The upload use case: validate, sniff, store bytes, commit rows and outbox, answer.

A batch is all or nothing: every file is validated and sniffed before anything is stored,
and the media rows and their outbox rows commit in one transaction before the answer.
The answer never waits for the analysis service; the outbox forwarder is woken instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from ingest_service.config import UploadLimits
from ingest_service.domain.blobs import BlobStore
from ingest_service.domain.models import (
    Media,
    ProcessingStatus,
    SniffedMedia,
    UploadFile,
    UploadRequest,
    UploadResult,
)
from ingest_service.domain.sniff import sniff
from ingest_service.errors import StorageUnavailable, invalid
from ingest_service.storage import repository
from ingest_service.storage.repository import writing
from mediatag_common.database import Database, after_commit
from mediatag_common.group_commit import GroupCommit

logger = logging.getLogger(__name__)

OWNER_ID_CHARACTERS = "A-Za-z0-9._:@-"
MAX_CONTEXT_KEY_LENGTH = 128
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


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


def validate_request(request: UploadRequest, limits: UploadLimits) -> None:
    """Everything about a batch that can be judged without looking into the bytes."""
    validate_owner_id(request.owner_id, limits)
    if len(request.category) > limits.max_category_length or _CONTROL_CHARACTERS.search(
        request.category
    ):
        raise invalid(
            "category",
            "INVALID_CATEGORY",
            f"at most {limits.max_category_length} characters, no control characters",
        )
    _validate_context(request, limits)
    if not request.files:
        raise invalid("files", "NO_FILES", "an upload needs at least one file")
    if len(request.files) > limits.max_files:
        raise invalid(
            "files",
            "TOO_MANY_FILES",
            f"{len(request.files)} files; at most {limits.max_files} per upload",
        )
    largest = max(limits.max_image_bytes, limits.max_video_bytes)
    for index, file in enumerate(request.files):
        if len(file.filename) > limits.max_filename_length or _CONTROL_CHARACTERS.search(
            file.filename
        ):
            raise invalid(
                f"files[{index}].filename",
                "INVALID_FILENAME",
                f"at most {limits.max_filename_length} characters, no control characters",
            )
        if not file.content:
            raise invalid(f"files[{index}].content", "EMPTY_FILE", "the file is empty")
        if len(file.content) > largest:
            raise invalid(
                f"files[{index}].content",
                "FILE_TOO_LARGE",
                f"{len(file.content)} bytes; a file may have at most {largest}",
            )


def _validate_context(request: UploadRequest, limits: UploadLimits) -> None:
    if len(request.context) > limits.max_context_entries:
        raise invalid("context", "INVALID_CONTEXT", f"at most {limits.max_context_entries} entries")
    for key, value in request.context.items():
        if not key or len(key) > MAX_CONTEXT_KEY_LENGTH or _CONTROL_CHARACTERS.search(key):
            raise invalid(
                "context",
                "INVALID_CONTEXT",
                f"key {key[:40]!r}: 1-{MAX_CONTEXT_KEY_LENGTH} characters, no control characters",
            )
        if len(value) > limits.max_context_value_length:
            raise invalid(
                "context",
                "INVALID_CONTEXT",
                f"value of {key!r}: at most {limits.max_context_value_length} characters",
            )


def upload_message(count: int, analysed: int) -> str:
    return (
        f"Uploaded {count} media file(s). {analysed} image(s) are being analyzed in the background."
    )


class Uploads:
    """Stores uploaded batches and queues their analysis through the outbox."""

    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        limits: UploadLimits,
        on_committed: Callable[[], None],
    ) -> None:
        self._blobs = blobs
        self._limits = limits
        self._on_committed = on_committed
        self._commits: GroupCommit[Sequence[Media]] = GroupCommit(lambda: writing(db), self._insert)

    async def upload(self, request: UploadRequest) -> UploadResult:
        """Store every file of ``request`` or none; raises IngestError on a bad item."""
        validate_request(request, self._limits)
        # Every file is judged before any is stored: a bad one rejects the batch untouched.
        sniffed = await asyncio.to_thread(self._sniff_all, request.files)
        # The files are independent: their hashing and writes (two fsyncs each) overlap.
        digests = await asyncio.gather(
            *(asyncio.to_thread(self._store, file.content) for file in request.files)
        )
        now = time.time()
        items = tuple(
            Media(
                id=str(uuid.uuid4()),
                owner_id=request.owner_id,
                category=request.category,
                context=dict(request.context),
                filename=file.filename,
                content_type=found.content_type,
                kind=found.kind,
                size_bytes=len(file.content),
                sha256=sha256,
                width=found.width,
                height=found.height,
                priority=request.priority,
                status=found.status,
                not_applicable_reason=found.not_applicable_reason,
                created_at=now,
                updated_at=now,
            )
            for file, found, sha256 in zip(request.files, sniffed, digests, strict=True)
        )
        await self._commits.commit(items)
        analysed = [item.id for item in items if item.status is ProcessingStatus.PENDING]
        for item, file in zip(items, request.files, strict=True):
            _log_stored(item, file.declared_content_type)
        return UploadResult(items, upload_message(len(items), len(analysed)))

    async def close(self) -> None:
        """Wait for uploads being committed."""
        await self._commits.close()

    async def _insert(self, conn: AsyncConnection, uploads: Sequence[Sequence[Media]]) -> None:
        """The media rows of ``uploads`` and the outbox rows of their images, in one go."""
        items = [item for upload in uploads for item in upload]
        await repository.insert_media(conn, items)
        analysed = [item.id for item in items if item.status is ProcessingStatus.PENDING]
        await repository.insert_outbox(conn, analysed, now=time.time())
        after_commit(conn, self._on_committed)

    def _sniff_all(self, files: Sequence[UploadFile]) -> list[SniffedMedia]:
        return [
            sniff(file.content, index=index, limits=self._limits)
            for index, file in enumerate(files)
        ]

    def _store(self, content: bytes) -> str:
        """Store ``content`` under its SHA-256 and return the hex digest."""
        sha256 = hashlib.sha256(content).hexdigest()
        try:
            self._blobs.put(sha256, len(content), [content])
        except OSError as exc:
            raise StorageUnavailable(f"blob store unavailable: {exc}") from exc
        return sha256


def _log_stored(item: Media, declared_content_type: str) -> None:
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
