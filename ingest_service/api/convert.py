"""Protobuf <-> domain conversion for the ingest API."""

from __future__ import annotations

from mediatag.ingest.v1 import ingest_pb2 as pb

from ingest_service.domain.library import Content
from ingest_service.domain.models import (
    Media,
    MediaKind,
    ProcessingStatus,
    StreamHeader,
    UploadFile,
    UploadRequest,
)
from ingest_service.domain.webhooks import Delivery
from mediatag_common.proto_time import timestamp

STATUS_TO_PB: dict[ProcessingStatus, pb.ProcessingStatus] = {
    status: getattr(pb, f"PROCESSING_STATUS_{status.value}") for status in ProcessingStatus
}
STATUS_FROM_PB: dict[int, ProcessingStatus] = {value: s for s, value in STATUS_TO_PB.items()}
KIND_TO_PB: dict[MediaKind, pb.MediaKind] = {
    kind: getattr(pb, f"MEDIA_KIND_{kind.value}") for kind in MediaKind
}


def upload_from_pb(request: pb.UploadMediaRequest) -> UploadRequest:
    return UploadRequest(
        owner_id=request.owner_id,
        category=request.category,
        context=dict(request.context),
        priority=request.priority,
        request_id=request.request_id,
        files=[
            UploadFile(
                filename=file.filename,
                declared_content_type=file.content_type,
                content=file.content,
            )
            for file in request.files
        ],
    )


def stream_header_from_pb(header: pb.UploadHeader) -> StreamHeader:
    return StreamHeader(
        owner_id=header.owner_id,
        filename=header.filename,
        declared_content_type=header.content_type,
        category=header.category,
        context=dict(header.context),
        priority=header.priority,
        request_id=header.request_id,
        size_bytes=header.size_bytes,
        sha256=header.sha256,
    )


def media_to_pb(media: Media) -> pb.Media:
    """The API form of ``media``; the embedding is sent only when it was loaded."""
    message = pb.Media(
        id=media.id,
        owner_id=media.owner_id,
        category=media.category,
        context=dict(media.context),
        filename=media.filename,
        content_type=media.content_type,
        kind=KIND_TO_PB[media.kind],
        size_bytes=media.size_bytes,
        sha256=media.sha256,
        width=media.width,
        height=media.height,
        priority=media.priority,
        status=STATUS_TO_PB[media.status],
        not_applicable_reason=media.not_applicable_reason,
        attempt=media.attempt,
        create_time=timestamp(media.created_at),
        update_time=timestamp(media.updated_at),
        status_revision=media.status_revision,
    )
    if media.outcome is not None:
        outcome = media.outcome
        message.tags.extend(outcome.tags)
        if outcome.embedding is not None:
            message.embedding.extend(outcome.embedding.tolist())
        message.embedding_dimensions = outcome.embedding_dimensions
        message.analyzer_name = outcome.analyzer_name
        message.analyzer_version = outcome.analyzer_version
        message.reused = outcome.reused
    if media.error is not None:
        message.error.reason = media.error.reason
        message.error.message = media.error.message
        message.error.attempt = media.error.attempt
    return message


def delivery_to_pb(delivery: Delivery) -> pb.WebhookDelivery:
    change = delivery.change
    dead = delivery.dead_at is not None
    return pb.WebhookDelivery(
        id=delivery.id,
        endpoint=delivery.endpoint,
        message_id=change.message_id,
        media_id=change.media_id,
        owner_id=change.owner_id,
        status=STATUS_TO_PB[change.status],
        revision=change.revision,
        state=pb.WEBHOOK_DELIVERY_STATE_DEAD if dead else pb.WEBHOOK_DELIVERY_STATE_RETRYING,
        attempts=delivery.attempts,
        last_error=delivery.last_error or "",
        event_time=timestamp(change.event_time),
        create_time=timestamp(delivery.created_at),
        next_attempt_time=None if dead else timestamp(delivery.next_attempt_at),
        dead_time=timestamp(delivery.dead_at),
    )


def content_to_pb(content: Content) -> pb.MediaContent:
    """One item of a batched read: its bytes, or why they are not in the answer."""
    media = content.media
    if media is None:
        return pb.MediaContent(media_id=content.media_id, state=pb.MEDIA_CONTENT_STATE_NOT_FOUND)
    if content.data is None:
        state = pb.MEDIA_CONTENT_STATE_READ_SEPARATELY
    else:
        state = pb.MEDIA_CONTENT_STATE_INCLUDED
    return pb.MediaContent(
        media_id=content.media_id,
        state=state,
        data=content.data or b"",
        content_type=media.content_type,
        size_bytes=media.size_bytes,
        sha256=media.sha256,
    )
