"""Domain objects of the ingest service, free of protobuf and SQL."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


class MediaKind(enum.StrEnum):
    """What the sniffed bytes turned out to be; values match the proto names without prefix."""

    IMAGE = "IMAGE"
    VIDEO = "VIDEO"


class ProcessingStatus(enum.StrEnum):
    """The analysis status of one item (SPEC §3); values match the proto names without prefix."""

    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    NOT_APPLICABLE = "NOT_APPLICABLE"


@dataclass(frozen=True)
class SniffedMedia:
    """What the bytes of one file are, as far as ingest needs to know."""

    content_type: str
    kind: MediaKind
    width: int = 0
    height: int = 0
    # Set when the item is stored but not analysed, e.g. "video" or "animated".
    not_applicable_reason: str = ""

    @property
    def status(self) -> ProcessingStatus:
        if self.not_applicable_reason:
            return ProcessingStatus.NOT_APPLICABLE
        return ProcessingStatus.PENDING


@dataclass(frozen=True)
class UploadFile:
    """One file of an upload as the client sent it; only ``content`` is trusted."""

    filename: str
    declared_content_type: str
    content: bytes


@dataclass(frozen=True)
class UploadRequest:
    owner_id: str
    files: Sequence[UploadFile]
    category: str = ""
    context: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0
    # Optional UUID (AIP-155): a retry with the same id gets the first answer.
    request_id: str = ""


@dataclass(frozen=True)
class StreamHeader:
    """The first message of a streamed upload: everything but the content."""

    owner_id: str
    filename: str = ""
    declared_content_type: str = ""
    category: str = ""
    context: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0
    request_id: str = ""
    # 0 = not declared; otherwise the content must be exactly this long.
    size_bytes: int = 0
    # "" = not declared; otherwise the hex SHA-256 the content must have.
    sha256: str = ""


@dataclass(frozen=True)
class RequestRecord:
    """An upload that carried a request id, as remembered for answering its retries."""

    request_id: str
    # SHA-256 of the request's content and metadata.
    digest: str
    media_ids: tuple[str, ...]
    message: str
    created_at: float


@dataclass(frozen=True)
class AnalysisFailure:
    """Why analysis of an item failed, as the analysis service reported it."""

    reason: str
    message: str
    attempt: int


@dataclass(frozen=True)
class AnalysisOutcome:
    """A completed analysis as mirrored from the analysis service."""

    tags: tuple[str, ...]
    embedding: npt.NDArray[np.float32] | None
    embedding_dimensions: int
    analyzer_name: str
    analyzer_version: str
    reused: bool


@dataclass(frozen=True)
class Media:
    """One stored item and its analysis state.

    ``embedding`` is None unless it was asked for (and exists).
    """

    id: str
    owner_id: str
    category: str
    context: Mapping[str, str]
    filename: str
    content_type: str
    kind: MediaKind
    size_bytes: int
    sha256: str
    width: int
    height: int
    priority: int
    status: ProcessingStatus
    not_applicable_reason: str
    created_at: float
    updated_at: float
    attempt: int = 0
    outcome: AnalysisOutcome | None = None
    error: AnalysisFailure | None = None
    status_revision: int = 0

    @classmethod
    def stored(
        cls,
        *,
        owner_id: str,
        category: str,
        context: Mapping[str, str],
        filename: str,
        priority: int,
        found: SniffedMedia,
        size_bytes: int,
        sha256: str,
        now: float,
    ) -> Media:
        """A new item for content just stored, of the type sniffing ``found``."""
        return cls(
            id=str(uuid.uuid4()),
            owner_id=owner_id,
            category=category,
            context=dict(context),
            filename=filename,
            content_type=found.content_type,
            kind=found.kind,
            size_bytes=size_bytes,
            sha256=sha256,
            width=found.width,
            height=found.height,
            priority=priority,
            status=found.status,
            not_applicable_reason=found.not_applicable_reason,
            created_at=now,
            updated_at=now,
        )


@dataclass(frozen=True)
class UploadResult:
    """The stored items in request order and the answer's message."""

    media: tuple[Media, ...]
    message: str


@dataclass(frozen=True)
class StatusUpdate:
    """One status change of the analysis service, to be applied to a media row."""

    revision: int
    media_id: str
    status: ProcessingStatus
    attempt: int
    event_time: float
    outcome: AnalysisOutcome | None = None
    error: AnalysisFailure | None = None
