"""The gRPC surface of the ingest service: protobuf <-> domain, nothing else.

Errors are raised as IngestError subclasses; the shared ErrorMappingInterceptor gives each its
status code from ``status_codes.STATUS_CODES``. With authentication on, the shared
AuthInterceptor has checked the caller's role against ``METHOD_ROLES`` before a method runs;
the methods check its owners (``auth.owner_scope()``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from mediatag.ingest.v1 import ingest_pb2 as pb
from mediatag.ingest.v1 import ingest_pb2_grpc

from ingest_service.api import convert
from ingest_service.api.status_codes import STATUS_CODES
from ingest_service.domain.content_reads import ContentReads
from ingest_service.domain.library import MediaLibrary, validate_media_id
from ingest_service.domain.models import Media, ProcessingStatus
from ingest_service.domain.stream_upload import StreamPart, StreamUploads
from ingest_service.domain.uploads import Uploads
from ingest_service.domain.webhook_backlog import WebhookBacklog
from ingest_service.errors import ContentReadStalled, invalid
from mediatag_common import auth
from mediatag_common.status import status_code, to_grpc_status

Context = grpc.aio.ServicerContext[Any, Any]

# The state filter of ListWebhookDeliveries: whether dead ones (None: both).
_DEAD_FILTER = {
    pb.WEBHOOK_DELIVERY_STATE_UNSPECIFIED: None,
    pb.WEBHOOK_DELIVERY_STATE_RETRYING: False,
    pb.WEBHOOK_DELIVERY_STATE_DEAD: True,
}

# Who may call what: the table lives below the service, since the web gateway checks uploads
# against it too.
METHOD_ROLES = auth.INGEST_METHOD_ROLES


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
            auth.owner_scope().check_owner(message.header.owner_id, "header.owner_id")
            yield convert.stream_header_from_pb(message.header)
        else:
            yield message.chunk


async def _abort(context: Context, status: grpc.Status) -> None:
    """Send ``status`` as the call's end; returns once sent, or once the client has gone."""
    with contextlib.suppress(grpc.aio.AbortError):
        await context.abort(status.code, status.details, status.trailing_metadata)


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Implements mediatag.ingest.v1.IngestService."""

    def __init__(
        self,
        *,
        uploads: Uploads,
        streams: StreamUploads,
        library: MediaLibrary,
        reads: ContentReads,
        webhooks: WebhookBacklog,
    ) -> None:
        self._uploads = uploads
        self._streams = streams
        self._library = library
        self._reads = reads
        self._webhooks = webhooks
        # Statuses of stalled reads on their way to clients that are not reading (see
        # ``_end_stalled``); kept so that they are not collected meanwhile.
        self._endings: set[asyncio.Task[None]] = set()

    async def UploadMedia(
        self, request: pb.UploadMediaRequest, context: Context
    ) -> pb.UploadMediaResponse:
        auth.owner_scope().check_owner(request.owner_id)
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
        result = await self._streams.upload(
            _stream_parts(request_iterator), auth.current_caller(context.peer())
        )
        return pb.UploadMediaStreamResponse(
            media=convert.media_to_pb(result.media[0]), message=result.message
        )

    async def _visible(self, media_id: str, *, with_embedding: bool) -> Media:
        """The item, if the caller may see its owner; an owner-restricted caller gets
        PERMISSION_DENIED for an unknown id too, so it cannot probe other owners' ids."""
        validate_media_id(media_id)
        await auth.owner_scope().check_visible(media_id, self._library.owners_of, "media_id")
        return await self._library.get(media_id, with_embedding=with_embedding)

    async def GetMedia(self, request: pb.GetMediaRequest, context: Context) -> pb.GetMediaResponse:
        media = await self._visible(
            request.media_id, with_embedding=request.view == pb.MEDIA_VIEW_FULL
        )
        return pb.GetMediaResponse(media=convert.media_to_pb(media))

    async def ListMedia(
        self, request: pb.ListMediaRequest, context: Context
    ) -> pb.ListMediaResponse:
        page = await self._library.list_page(
            owner_id=auth.owner_scope().list_owner(request.owner_id),
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
        media_ids = list(request.media_ids)
        for index, media_id in enumerate(media_ids):
            validate_media_id(media_id, f"media_ids[{index}]")
        owner_id = await auth.owner_scope().check_selection(
            media_ids, request.owner_id, self._library.owners_of
        )
        reprocessed = await self._library.reprocess(
            media_ids,
            owner_id=owner_id,
            status=_status_filter(request.status),
        )
        return pb.ReprocessMediaResponse(
            media_ids=reprocessed.media_ids, count=len(reprocessed.media_ids)
        )

    async def ReadMediaContent(
        self, request: pb.ReadMediaContentRequest, context: Context
    ) -> AsyncIterator[pb.ReadMediaContentResponse]:
        media = await self._visible(request.media_id, with_embedding=False)
        caller = auth.current_caller(context.peer())
        first = True
        # A cancelled call (client gone, or stalled) propagates CancelledError untouched:
        # swallowing it leaks the call (grpc/grpc#43360).
        chunks = self._reads.chunks(media, caller, self._end_stalled(context))
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
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

    def _end_stalled(self, context: Context) -> Callable[[ContentReadStalled], None]:
        """What ends the current read when its client stops taking chunks.

        Its handler is blocked sending a chunk the client does not take, so it cannot raise
        the refusal itself: the status is sent from a task of its own, where it waits behind
        the chunks not taken (the client reads it when it reads again, or never), and the
        handler is cancelled, which closes the blob and frees the call and the read's slot.
        """
        handler = asyncio.current_task()
        assert handler is not None

        def end(refusal: ContentReadStalled) -> None:
            status = to_grpc_status(refusal, status_code(refusal, STATUS_CODES))
            ending = asyncio.create_task(_abort(context, status), name="end-stalled-content-read")
            self._endings.add(ending)
            ending.add_done_callback(self._endings.discard)
            handler.cancel()

        return end

    async def ReadMediaContents(
        self, request: pb.ReadMediaContentsRequest, context: Context
    ) -> pb.ReadMediaContentsResponse:
        contents = await self._library.contents(request.media_ids, owners=auth.owner_scope().owners)
        # The answer's bytes count as held until the call ends (sent, or given up). The stubs
        # type the callback as a class of their own, which no function is.
        context.add_done_callback(
            lambda _: self._library.release(contents.held_bytes)  # type: ignore[arg-type]
        )
        return pb.ReadMediaContentsResponse(
            contents=[convert.content_to_pb(item) for item in contents.items]
        )

    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: Context
    ) -> pb.ListWebhookDeliveriesResponse:
        if request.state not in _DEAD_FILTER:
            raise invalid("state", "INVALID_STATE", f"unknown state {request.state}")
        scope = auth.owner_scope()
        scope.check_owner(request.owner_id)
        page = await self._webhooks.list_page(
            dead=_DEAD_FILTER[request.state],
            endpoint=request.endpoint,
            owner_id=request.owner_id,
            owners=scope.owners,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListWebhookDeliveriesResponse(
            deliveries=[convert.delivery_to_pb(d) for d in page.deliveries],
            next_page_token=page.next_page_token,
        )

    async def RetryWebhookDeliveries(
        self, request: pb.RetryWebhookDeliveriesRequest, context: Context
    ) -> pb.RetryWebhookDeliveriesResponse:
        delivery_ids = list(request.delivery_ids)
        scope = auth.owner_scope()
        if scope.restricted and delivery_ids:
            await scope.check_selection(
                [str(i) for i in delivery_ids], "", self._delivery_owners, "delivery_ids"
            )
        count = await self._webhooks.retry(
            delivery_ids, endpoint=request.endpoint, owners=scope.owners
        )
        return pb.RetryWebhookDeliveriesResponse(count=count)

    async def _delivery_owners(self, delivery_ids: Sequence[str]) -> dict[str, str]:
        """``owners_of`` for the owner checks, which name items by strings."""
        owners = await self._webhooks.owners_of([int(i) for i in delivery_ids])
        return {str(i): owner for i, owner in owners.items()}
