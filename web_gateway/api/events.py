"""``GET /api/v1/events``: status changes as Server-Sent Events.

Filters as ``WatchStatus``: ``owner_id``, ``media_ids`` (repeated). Each change is an event
``change`` whose ``id`` is its revision and whose data is its ``WatchStatusResponse`` in
JSON; a browser's ``EventSource`` reconnects with ``Last-Event-ID`` and misses nothing (a
client without one may give ``start_revision``). A connection idle for the keep-alive
interval gets a ``bookmark`` event carrying the revision it is at. A revision the event log
no longer holds (or a log that was replaced) ends the stream with a ``reset`` event: the
client reloads its state and watches again without a revision. Other ends (the gateway
shutting down, the client too slow) send an ``ended`` event with the ``google.rpc.Status``;
reconnecting with the last id resumes.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from mediatag.analysis.v1 import analysis_pb2 as apb

from mediatag_common.auth import OwnerScope
from web_gateway.api.callers import Caller
from web_gateway.api.context import caller_of, gateway_of
from web_gateway.domain.events import Change, WatchFilter
from web_gateway.domain.watches import Visibility
from web_gateway.errors import Refusal, denied, invalid
from web_gateway.protojson import to_json

logger = logging.getLogger(__name__)

# Browsers reconnect this many milliseconds after a stream ends.
_RECONNECT_MS = 2000
_FILTER_PARAMETERS = {"owner_id", "ownerId", "media_ids", "mediaIds", "start_revision"}


def _revision(text: str, where: str) -> int:
    try:
        revision = int(text)
    except ValueError:
        revision = -1
    if revision < 0:
        raise invalid(where, "INVALID_REVISION", f"{where} must be a revision (0 or more)")
    return revision


def _scope(caller: Caller, owner_id: str) -> tuple[str, Visibility]:
    """The owner to filter by and who-sees-what for ``caller``: other owners' changes are
    left out as if unknown; naming another owner is refused, as WatchStatus does."""
    principal = caller.principal
    if principal is None or principal.owners is None:
        return owner_id, None
    scope = OwnerScope(principal.owners)
    if owner_id and not scope.may_see(owner_id):
        raise denied(
            "OWNER_NOT_ALLOWED",
            f"this token may not watch owner {owner_id!r}",
            field="owner_id",
        )
    if not owner_id and len(principal.owners) == 1:
        (owner_id,) = principal.owners
    return owner_id, scope.may_see


def _watch_filter(request: web.Request) -> tuple[WatchFilter, int | None]:
    query = request.query
    for name in query:
        if name not in _FILTER_PARAMETERS:
            raise invalid(name, "UNKNOWN_PARAMETER", f"unknown query parameter {name!r}")
    media_ids = frozenset(query.getall("media_ids", []) + query.getall("mediaIds", []))
    limit = gateway_of(request).config.events.max_media_ids
    if len(media_ids) > limit:
        raise invalid("media_ids", "TOO_MANY_MEDIA_IDS", f"at most {limit} media ids")
    owner_id = query.get("owner_id") or query.get("ownerId") or ""
    after: int | None = None
    if "Last-Event-ID" in request.headers:
        after = _revision(request.headers["Last-Event-ID"], "Last-Event-ID")
    elif "start_revision" in query:
        after = _revision(query["start_revision"], "start_revision") or None
    return WatchFilter(owner_id, media_ids), after


def _frame(event: str, data: bytes, revision: int | None = None) -> bytes:
    head = f"id: {revision}\n" if revision is not None else ""
    return f"{head}event: {event}\ndata: ".encode() + data + b"\n\n"


def _bookmark(revision: int) -> bytes:
    data = to_json(apb.WatchStatusResponse(revision=revision, bookmark=apb.Bookmark()))
    return _frame("bookmark", data, revision)


async def events(request: web.Request) -> web.StreamResponse:
    gateway = gateway_of(request)
    config = gateway.config.events
    asked, after = _watch_filter(request)
    caller = caller_of(request)
    owner_id, visible = _scope(caller, asked.owner_id)
    watch_filter = WatchFilter(owner_id, asked.media_ids)
    subscription = await gateway.watches.subscribe(
        watch_filter, after=after, visible=visible, holder=caller.holder
    )
    logger.debug("event stream of %s opened after revision %d", watch_filter, subscription.sent)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    )
    stalled = False
    try:
        async with asyncio.timeout(config.write_timeout):
            await response.prepare(request)
            await response.write(f"retry: {_RECONNECT_MS}\n\n".encode())
        while True:
            try:
                item = await subscription.next(config.keepalive_interval)
            except Refusal as ended:
                event = "reset" if ended.resync else "ended"
                async with asyncio.timeout(config.write_timeout):
                    await response.write(_frame(event, to_json(ended.status)))
                    # Here, not by aiohttp after the handler: its end waits for the client
                    # to read what is buffered, with no time limit.
                    await response.write_eof()
                return response
            if isinstance(item, Change):
                frame = _frame("change", item.data, item.revision)
            else:
                frame = _bookmark(item.revision)
            # A client that stops reading holds this write; past the timeout it is let go.
            async with asyncio.timeout(config.write_timeout):
                await response.write(frame)
    except ConnectionResetError:
        # The client went away; it resumes by reconnecting.
        return response
    except TimeoutError:
        # The client stopped reading; it resumes by reconnecting.
        stalled = True
        return response
    finally:
        logger.debug("event stream of %s closed at revision %d", watch_filter, subscription.sent)
        await subscription.close()
        if stalled and request.transport is not None:
            # Ending the response would wait for the client to read what is still to be
            # sent, for ever: close the connection without sending it.
            request.transport.abort()
