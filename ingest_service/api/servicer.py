"""The gRPC surface of the ingest service: protobuf <-> domain, nothing else.

Errors are raised as IngestError subclasses and mapped to statuses by the shared
ErrorMappingInterceptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from mediatag.ingest.v1 import ingest_pb2 as pb
from mediatag.ingest.v1 import ingest_pb2_grpc

from ingest_service.api import convert
from ingest_service.domain.library import MediaLibrary
from ingest_service.domain.models import ProcessingStatus
from ingest_service.domain.stream_upload import StreamPart, StreamUploads
from ingest_service.domain.uploads import Uploads
from ingest_service.errors import invalid

Context = grpc.aio.ServicerContext[Any, Any]


def _status_filter(value: int) -> ProcessingStatus | None:
    """The status a request filters by; None for UNSPECIFIED (no filter)."""
    if value == pb.PROCESSING_STATUS_UNSPECIFIED:
        return None
    status = convert.STATUS_FROM_PB.get(value)
    if status is None:
        raise invalid("status", "INVALID_STATUS", f"unknown status {value}")
    return status


async def _stream_parts(
    requests: AsyncIterator[pb.UploadMediaStreamRequest],
) -> AsyncIterator[StreamPart]:
    """The messages of an UploadMediaStream call as headers and chunks (a message without
    a payload is an empty chunk)."""
    async for message in requests:
        if message.WhichOneof("payload") == "header":
            yield convert.stream_header_from_pb(message.header)
        else:
            yield message.chunk


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Implements mediatag.ingest.v1.IngestService."""

    def __init__(self, *, uploads: Uploads, streams: StreamUploads, library: MediaLibrary) -> None:
        self._uploads = uploads
        self._streams = streams
        self._library = library

    async def UploadMedia(
        self, request: pb.UploadMediaRequest, context: Context
    ) -> pb.UploadMediaResponse:
        result = await self._uploads.upload(convert.upload_from_pb(request))
        return pb.UploadMediaResponse(
            media=[convert.media_to_pb(m) for m in result.media],
            count=len(result.media),
            message=result.message,
        )

    async def UploadMediaStream(
        self, request_iterator: AsyncIterator[pb.UploadMediaStreamRequest], context: Context
    ) -> pb.UploadMediaStreamResponse:
        # A client that cancels mid-stream cancels this coroutine: CancelledError passes
        # through untouched (grpc/grpc#43360), and the partial file is removed on the way.
        result = await self._streams.upload(_stream_parts(request_iterator))
        return pb.UploadMediaStreamResponse(
            media=convert.media_to_pb(result.media[0]), message=result.message
        )

    async def GetMedia(self, request: pb.GetMediaRequest, context: Context) -> pb.GetMediaResponse:
        media = await self._library.get(
            request.media_id, with_embedding=request.view == pb.MEDIA_VIEW_FULL
        )
        return pb.GetMediaResponse(media=convert.media_to_pb(media))

    async def ListMedia(
        self, request: pb.ListMediaRequest, context: Context
    ) -> pb.ListMediaResponse:
        page = await self._library.list_page(
            owner_id=request.owner_id,
            status=_status_filter(request.status),
            page_size=request.page_size,
            page_token=request.page_token,
            with_embedding=request.view == pb.MEDIA_VIEW_FULL,
        )
        return pb.ListMediaResponse(
            media=[convert.media_to_pb(m) for m in page.media],
            next_page_token=page.next_page_token,
        )

    async def ReprocessMedia(
        self, request: pb.ReprocessMediaRequest, context: Context
    ) -> pb.ReprocessMediaResponse:
        reprocessed = await self._library.reprocess(
            list(request.media_ids),
            owner_id=request.owner_id,
            status=_status_filter(request.status),
        )
        return pb.ReprocessMediaResponse(
            media_ids=reprocessed.media_ids, count=len(reprocessed.media_ids)
        )

    async def ReadMediaContent(
        self, request: pb.ReadMediaContentRequest, context: Context
    ) -> AsyncIterator[pb.ReadMediaContentResponse]:
        media = await self._library.get(request.media_id, with_embedding=False)
        first = True
        # A cancelled call (client gone) propagates CancelledError untouched: swallowing it
        # leaks the call (grpc/grpc#43360).
        async for chunk in self._library.content(media):
            if first:
                first = False
                yield pb.ReadMediaContentResponse(
                    data=chunk,
                    content_type=media.content_type,
                    size_bytes=media.size_bytes,
                    sha256=media.sha256,
                )
            else:
                yield pb.ReadMediaContentResponse(data=chunk)
