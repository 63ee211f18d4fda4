"""``/api/v1/media``: the ingest service's items, their content, uploads, reprocessing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc
from aiohttp import BodyPartReader, web
from google.rpc import code_pb2
from mediatag.ingest.v1 import ingest_pb2 as ipb

from mediatag_common import auth
from mediatag_common.caller_slots import SlotsFull
from web_gateway.api.context import body, call, caller_of, gateway_of, query, reply
from web_gateway.errors import Refusal, denied, exhausted, invalid, unavailable
from web_gateway.protojson import from_query
from web_gateway.upstream import INGEST, timed_out

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Bytes read per step of an upload or a download.
_CHUNK_BYTES = 256 * 1024
# Bytes per message of a streamed upload, for what the gateway held before it knew the file
# was too large to hold (one message of it all would pass ingest's cap on a message).
_STREAM_CHUNK_BYTES = 1024 * 1024
# A text field of an upload form (owner, category, one context entry...), and how many a
# form may have: ingest takes 32 context entries and four other fields.
_MAX_FIELD_BYTES = 64 * 1024
_MAX_FIELDS = 64
# What a field or a file adds to the UploadMedia message beside its name and bytes (tags,
# lengths, a map entry's wrapping), counted so that a batch within max_batch_upload_bytes is
# a message within ingest's cap.
_PART_OVERHEAD = 32
# The calls an upload may become, whose roles a caller needs (one file too large to hold is
# streamed).
_UPLOAD_METHODS = tuple(
    f"/{auth.INGEST_SERVICE}/{method}" for method in ("UploadMedia", "UploadMediaStream")
)
# Content never changes under its id; a browser may keep it for a day.
_CONTENT_CACHE = "private, max-age=86400"


async def list_media(request: web.Request) -> web.Response:
    listed = await call(
        gateway_of(request).upstream.ingest.ListMedia,
        query(request, ipb.ListMediaRequest()),
        request,
    )
    return reply(listed)


async def get_media(request: web.Request) -> web.Response:
    asked = query(request, ipb.GetMediaRequest())
    asked.media_id = request.match_info["media_id"]
    return reply(await call(gateway_of(request).upstream.ingest.GetMedia, asked, request))


async def reprocess(request: web.Request) -> web.Response:
    asked = await body(request, ipb.ReprocessMediaRequest())
    return reply(await call(gateway_of(request).upstream.ingest.ReprocessMedia, asked, request))


def _etag_matches(if_none_match: str, etag: str) -> bool:
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


async def content(request: web.Request) -> web.StreamResponse:
    """The stored bytes, typed as sniffed, with the SHA-256 as ETag (a matching
    ``If-None-Match`` gets 304 once the caller's right to read them has been checked)."""
    gateway = gateway_of(request)
    stream = gateway.upstream.ingest.ReadMediaContent(
        ipb.ReadMediaContentRequest(media_id=request.match_info["media_id"]),
        metadata=caller_of(request).metadata,
    )
    try:
        first = await _next_content(request, stream)
        if not isinstance(first, ipb.ReadMediaContentResponse):
            raise unavailable("CONTENT_UNAVAILABLE", "the ingest service sent no content")
        etag = f'"{first.sha256}"'
        headers = {
            "ETag": etag,
            "Cache-Control": _CONTENT_CACHE,
            # Never run as a page of this origin, whatever the bytes are.
            "Content-Security-Policy": "default-src 'none'; sandbox",
        }
        if _etag_matches(request.headers.get("If-None-Match", ""), etag):
            return web.Response(status=304, headers=headers)
        response = web.StreamResponse(
            headers={**headers, "Content-Type": first.content_type or "application/octet-stream"}
        )
        response.content_length = first.size_bytes
        try:
            await _send_content(request, response, first, stream)
        except (Refusal, TimeoutError, ConnectionResetError) as cut:
            # The headers are out: a refusal now would be read as part of the bytes. The
            # connection is cut instead, so the client sees a body short of its length.
            logger.debug("content of %s cut short: %r", request.match_info["media_id"], cut)
            _abort(request)
        return response
    finally:
        stream.cancel()


async def _next_content(request: web.Request, stream: Any) -> object:
    """The next message of a ``ReadMediaContent`` call (or ``grpc.aio.EOF``); a service that
    sends nothing for the call timeout is refused."""
    try:
        async with asyncio.timeout(gateway_of(request).config.call_timeout):
            return await stream.read()
    except TimeoutError:
        raise timed_out(INGEST) from None
    except grpc.aio.AioRpcError as error:
        raise gateway_of(request).upstream.refusal(error, INGEST) from None


async def _send_content(
    request: web.Request, response: web.StreamResponse, first: object, stream: Any
) -> None:
    """Write the content to the client as it comes; raises :class:`TimeoutError` when the
    client does not take a write in time (:class:`ConnectionResetError` when it is gone),
    :class:`Refusal` when the service fails."""
    config = gateway_of(request).config
    chunk = first
    # A client that does not read holds the write, and with it the service's call.
    async with asyncio.timeout(config.content_write_timeout):
        await response.prepare(request)
    while isinstance(chunk, ipb.ReadMediaContentResponse):
        async with asyncio.timeout(config.content_write_timeout):
            await response.write(chunk.data)
        chunk = await _next_content(request, stream)
    async with asyncio.timeout(config.content_write_timeout):
        await response.write_eof()


def _abort(request: web.Request) -> None:
    """Close the connection at once, without sending what its buffer still holds."""
    transport = request.transport
    if transport is not None:
        transport.abort()


async def upload(request: web.Request) -> web.Response:
    """``multipart/form-data``: the fields of ``UploadMediaRequest`` first (``context`` as
    repeated ``key=value``), then the files. Several files are one ``UploadMedia`` (a bad
    one refuses them all); one file too large to hold goes through ``UploadMediaStream``.
    The answer is an ``UploadMediaResponse`` either way."""
    gateway = gateway_of(request)
    caller = caller_of(request)
    if caller.principal is not None:
        # Refused here, before the body is read, as ingest would refuse it after.
        for method in _UPLOAD_METHODS:
            if not auth.may_call(caller.principal, auth.INGEST_METHOD_ROLES, method):
                refusal = auth.role_not_allowed(auth.INGEST_METHOD_ROLES, method)
                raise denied(refusal.reason, refusal.message)
    if not request.content_type.startswith("multipart/form-data"):
        raise invalid("body", "MULTIPART_REQUIRED", "an upload is multipart/form-data")
    holder = caller.holder
    full = gateway.uploads.take(holder)
    if full is not None:
        raise _too_many_uploads(full, gateway.uploads.limit(full))
    try:
        return reply(await _Upload(request).run())
    finally:
        gateway.uploads.give_back(holder)


def _too_many_uploads(full: SlotsFull, limit: int) -> Refusal:
    if full is SlotsFull.CALLER:
        return exhausted(
            "TOO_MANY_UPLOADS_FOR_CALLER",
            f"the gateway takes at most {limit} uploads of one caller at once; try again when "
            "one has finished",
            maxUploadsPerCaller=str(limit),
        )
    return exhausted(
        "TOO_MANY_UPLOADS",
        f"the gateway takes at most {limit} uploads at once; try again shortly",
        maxUploads=str(limit),
    )


class _Upload:
    """One multipart upload on its way to the ingest service."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._gateway = gateway_of(request)
        self._fields: dict[str, list[str]] = {}
        self._field_count = 0
        # The files of the batch, in the message that is sent (its fields are merged in then):
        # each file's bytes are held once, not copied into another message at the end.
        self._batch = ipb.UploadMediaRequest()
        # Bytes of the UploadMedia message so far (fields, files and their overhead).
        self._held = 0
        self._stream: Any = None
        # The answer of a stream the service ended early (it needed no more).
        self._answer: ipb.UploadMediaResponse | None = None

    async def run(self) -> ipb.UploadMediaResponse:
        try:
            reader = await self._request.multipart()
            while (part := await self._read(reader.next())) is not None:
                if not isinstance(part, BodyPartReader):
                    raise invalid("body", "NESTED_MULTIPART", "nested multipart is not taken")
                if part.filename is None:
                    await self._field(part)
                else:
                    await self._file(part)
            return await self._send()
        finally:
            if self._stream is not None:
                self._stream.cancel()

    async def _read(self, reading: Awaitable[_T]) -> _T:
        """``reading`` of the client's body; a client that sends nothing for the idle timeout
        is refused, and its upload gives its place back."""
        idle = self._gateway.config.upload_idle_timeout
        try:
            async with asyncio.timeout(idle):
                return await reading
        except TimeoutError:
            raise Refusal.of(
                code_pb2.DEADLINE_EXCEEDED,
                "UPLOAD_STALLED",
                f"nothing of the upload received for {idle:g} s",
            ) from None

    @property
    def _streaming(self) -> bool:
        return self._stream is not None or self._answer is not None

    def _metadata(self) -> ipb.UploadMediaRequest:
        fields = dict(self._fields)
        context: dict[str, str] = {}
        for entry in fields.pop("context", []):
            key, sep, value = entry.partition("=")
            if not sep:
                raise invalid("context", "INVALID_CONTEXT", "context entries are key=value")
            context[key] = value
        asked = from_query(fields, ipb.UploadMediaRequest())
        asked.context.update(context)
        return asked

    async def _field(self, part: BodyPartReader) -> None:
        name = part.name or ""
        if self._batch.files or self._streaming:
            raise invalid(name, "FIELD_AFTER_FILES", "the form's fields go before its files")
        self._field_count += 1
        if self._field_count > _MAX_FIELDS:
            raise invalid(name, "TOO_MANY_FIELDS", f"a form has at most {_MAX_FIELDS} fields")
        value = bytearray()
        while chunk := await self._read(part.read_chunk(_CHUNK_BYTES)):
            value += chunk
            if len(value) > _MAX_FIELD_BYTES:
                raise invalid(name, "FIELD_TOO_LARGE", f"at most {_MAX_FIELD_BYTES} bytes")
        text = value.decode("utf-8", errors="replace")
        self._held += len(name.encode()) + len(text.encode()) + _PART_OVERHEAD
        self._fields.setdefault(name, []).append(text)

    async def _file(self, part: BodyPartReader) -> None:
        if self._streaming:
            limit = self._gateway.config.max_batch_upload_bytes
            raise invalid(
                "files", "LARGE_FILE_NOT_ALONE", f"a file over {limit} bytes is uploaded alone"
            )
        content = bytearray()
        named = (part.filename or "") + part.headers.get("Content-Type", "")
        await self._hold(part, content, len(named.encode()) + _PART_OVERHEAD)
        while chunk := await self._read(part.read_chunk(_CHUNK_BYTES)):
            if self._streaming:
                await self._write(ipb.UploadMediaStreamRequest(chunk=chunk))
                continue
            content += chunk
            await self._hold(part, content, len(chunk))
        if not self._streaming and (part.filename or content):
            # The buffer is let go before the message takes its copy: at most two of a file.
            data = bytes(content)
            content.clear()
            self._batch.files.add(
                filename=part.filename or "",
                content_type=part.headers.get("Content-Type", ""),
                content=data,
            )

    async def _hold(self, part: BodyPartReader, content: bytearray, size: int) -> None:
        """Count ``size`` more bytes of the batch; past the bound the file, alone, goes to
        a stream (``content``, held so far, is sent and emptied), with others it is refused."""
        limit = self._gateway.config.max_batch_upload_bytes
        self._held += size
        if self._held <= limit:
            return
        if self._batch.files:
            raise invalid(
                "files",
                "BATCH_TOO_LARGE",
                f"an upload of several files may hold {limit} bytes with its fields; send "
                "large files alone",
            )
        await self._open_stream(part, content)
        content.clear()

    async def _open_stream(self, part: BodyPartReader, held: bytearray) -> None:
        asked = self._metadata()
        header = ipb.UploadHeader(
            owner_id=asked.owner_id,
            category=asked.category,
            context=asked.context,
            filename=part.filename or "",
            content_type=part.headers.get("Content-Type", ""),
            request_id=asked.request_id,
            priority=asked.priority,
        )
        self._stream = self._gateway.upstream.ingest.UploadMediaStream(
            metadata=caller_of(self._request).metadata
        )
        await self._write(ipb.UploadMediaStreamRequest(header=header))
        with memoryview(held) as view:
            for start in range(0, len(view), _STREAM_CHUNK_BYTES):
                chunk = bytes(view[start : start + _STREAM_CHUNK_BYTES])
                await self._write(ipb.UploadMediaStreamRequest(chunk=chunk))

    async def _write(self, message: ipb.UploadMediaStreamRequest) -> None:
        if self._answer is not None:
            return
        try:
            # A service that takes nothing more holds the write (run() cancels the call).
            async with asyncio.timeout(self._gateway.config.call_timeout):
                await self._stream.write(message)
        except TimeoutError:
            raise timed_out(INGEST) from None
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError):
            # The service answered early (mostly a refusal): the call's status says.
            self._answer = await self._finish_stream()

    async def _finish_stream(self) -> ipb.UploadMediaResponse:
        stream, self._stream = self._stream, None
        try:
            async with asyncio.timeout(self._gateway.config.call_timeout):
                with contextlib.suppress(grpc.aio.UsageError, RuntimeError):
                    await stream.done_writing()
                answer: ipb.UploadMediaStreamResponse = await stream
        except TimeoutError:
            raise timed_out(INGEST) from None
        except grpc.aio.AioRpcError as error:
            raise self._gateway.upstream.refusal(error, INGEST) from None
        finally:
            # Ends a call that did not answer in time; nothing once it has.
            stream.cancel()
        return ipb.UploadMediaResponse(media=[answer.media], count=1, message=answer.message)

    async def _send(self) -> ipb.UploadMediaResponse:
        if self._answer is not None:
            return self._answer
        if self._stream is not None:
            return await self._finish_stream()
        self._batch.MergeFrom(self._metadata())
        return await call(self._gateway.upstream.ingest.UploadMedia, self._batch, self._request)
