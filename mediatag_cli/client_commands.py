"""The client commands: each calls the ingest or analysis service and prints the answer.

Each command is ``async (args, client) -> exit status``. A refusal from a service ends the
command with status 1 after ``error: <CODE> <reason>: <message>`` on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import mimetypes
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
from mediatag.analysis.v1 import analysis_pb2, analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from mediatag_cli.progress import Display, StatusBoard, redraw
from mediatag_cli.render import (
    DELIVERY_STATES,
    change_line,
    delivery_table,
    json_text,
    media_details,
    media_line,
    media_table,
    queue_summary,
    rpc_error_lines,
    status_name,
    to_dict,
    to_json,
)
from mediatag_cli.settings import ClientSettings
from mediatag_cli.watching import ResumableWatch
from mediatag_common.grpc_server import channel_options, open_channel
from mediatag_common.untrusted_text import escaped

if TYPE_CHECKING:
    from mediatag.analysis.v1.analysis_pb2_grpc import AnalysisServiceAsyncStub
    from mediatag.ingest.v1.ingest_pb2_grpc import IngestServiceAsyncStub

T = TypeVar("T")
MIB = 1024 * 1024
# ListMedia's largest page.
_MAX_PAGE_SIZE = 1000


class CommandFailed(Exception):
    """Ends a command with exit status 1 after printing ``lines`` to stderr."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@asynccontextmanager
async def _channel(
    service: str, address: str, client: ClientSettings, max_message_bytes: int | None
) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to ``service`` (TLS and token as configured); a failed call made through it
    becomes ``CommandFailed``."""
    options = channel_options() if max_message_bytes is None else channel_options(max_message_bytes)
    try:
        channel = open_channel(address, options=options, tls=client.tls, token=client.token)
    except OSError as error:
        # An unreadable certificate or key file.
        raise CommandFailed(
            [f"error: {error.filename or ''}: {error.strerror or error}"]
        ) from error
    try:
        async with channel:
            yield channel
    except grpc.aio.AioRpcError as error:
        raise CommandFailed(rpc_error_lines(error, service, address)) from error


@asynccontextmanager
async def _ingest(
    client: ClientSettings, max_message_bytes: int | None = None
) -> AsyncIterator[IngestServiceAsyncStub]:
    async with _channel("ingest", client.ingest_address, client, max_message_bytes) as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel)


@asynccontextmanager
async def _analysis(client: ClientSettings) -> AsyncIterator[AnalysisServiceAsyncStub]:
    async with _channel("analysis", client.analysis_address, client, None) as channel:
        yield analysis_pb2_grpc.AnalysisServiceStub(channel)


def _say(text: str) -> None:
    # Escaped whole too: a field the renderers did not mark as untrusted still cannot
    # reach the terminal as a control sequence.
    print(escaped(text, keep="\n"), flush=True)


def _warn(text: str) -> None:
    print(escaped(text, keep="\n"), file=sys.stderr, flush=True)


# ---- upload ----


def _media_file(path: str) -> ingest_pb2.MediaFile:
    """The file at ``path``; its type is guessed from the name only as a hint to the server."""
    try:
        content = Path(path).read_bytes()
    except OSError as error:
        raise CommandFailed([f"error: cannot read {path}: {error.strerror or error}"]) from error
    content_type, _ = mimetypes.guess_type(path)
    return ingest_pb2.MediaFile(
        filename=Path(path).name, content_type=content_type or "", content=content
    )


async def upload(args: argparse.Namespace, client: ClientSettings) -> int:
    """``upload FILE... --owner ID``: store files; with ``--watch``, follow their analysis."""
    request = ingest_pb2.UploadMediaRequest(
        owner_id=args.owner,
        category=args.category,
        context=dict(args.context or ()),
        priority=args.priority,
        files=[_media_file(path) for path in args.files],
    )
    # The channel must let the whole batch through; the server enforces the real limits.
    async with _ingest(client, max_message_bytes=request.ByteSize() + MIB) as ingest:
        response = await ingest.UploadMedia(request, timeout=client.timeout)
    if client.json:
        _say(to_json(response, one_line=args.watch))
    else:
        _say(response.message)
        for media in response.media:
            _say("  " + media_line(media))
    pending = [m for m in response.media if m.status == ingest_pb2.PROCESSING_STATUS_PENDING]
    if not args.watch or not pending:
        return 0
    return await _follow_analysis(pending, client)


async def _follow_analysis(items: list[ingest_pb2.Media], client: ClientSettings) -> int:
    """Watch ``items`` until each is terminal: 0 if none failed, else 1."""
    progress = StatusBoard(sys.stdout, _display(client), items)

    def until_terminal(_: int) -> analysis_pb2.WatchStatusRequest:
        # A fresh snapshot of what is left: until_terminal needs to know each item's state.
        return analysis_pb2.WatchStatusRequest(
            media_ids=progress.unfinished_ids, send_initial_state=True, until_terminal=True
        )

    notice = _warn if client.json else progress.notice
    async with _analysis(client) as analysis:
        watch = ResumableWatch(
            analysis,
            until_terminal(0),
            address=client.analysis_address,
            timeout=client.timeout,
            notice=notice,
            resume=until_terminal,
        )
        async with aclosing(watch.responses()) as responses:
            async for response in responses:
                if client.json:
                    _say(to_json(response, one_line=True))
                if response.HasField("change"):
                    progress.update(response.change)
                if progress.done:
                    break
    progress.finish()
    if not progress.done:
        _warn("error: the analysis service ended the watch before every item was finished")
        return 1
    return 1 if progress.failed else 0


# ---- watch ----


async def watch(args: argparse.Namespace, client: ClientSettings) -> int:
    """``watch [MEDIA_ID...]``: one line per status change until interrupted.

    With ``--until-terminal`` it ends once every item is terminal: 1 if any failed, else 0.
    """
    request = analysis_pb2.WatchStatusRequest(
        media_ids=args.media_ids,
        owner_id=args.owner,
        start_revision=args.since,
        send_initial_state=args.initial,
        until_terminal=args.until_terminal,
    )
    # Only kept for --until-terminal: an endless watch of everything would grow without bound.
    latest: dict[str, int] = {}
    display = _display(client)
    board = StatusBoard(sys.stdout, display) if display is Display.LIVE else None
    async with _analysis(client) as analysis:
        watcher = ResumableWatch(
            analysis,
            request,
            address=client.analysis_address,
            timeout=client.timeout,
            notice=board.notice if board else _warn,
        )
        async with aclosing(watcher.responses()) as responses:
            async for response in responses:
                if args.until_terminal and response.HasField("change"):
                    latest[response.change.media_id] = response.change.status
                if client.json:
                    _say(to_json(response, one_line=True))
                elif board is not None:
                    if response.HasField("change"):
                        board.update(response.change)
                elif (line := change_line(response)) is not None:
                    _say(line)
    return 1 if analysis_pb2.PROCESSING_STATUS_FAILED in latest.values() else 0


def _display(client: ClientSettings) -> Display:
    """Redrawn in place on a terminal, a line per change into a pipe, nothing with --json."""
    if client.json:
        return Display.NONE
    return Display.LIVE if sys.stdout.isatty() else Display.LINES


# ---- single calls ----


async def get(args: argparse.Namespace, client: ClientSettings) -> int:
    """``get MEDIA_ID [--embedding]``."""
    view = ingest_pb2.MEDIA_VIEW_FULL if args.embedding else ingest_pb2.MEDIA_VIEW_BASIC
    async with _ingest(client) as ingest:
        response = await ingest.GetMedia(
            ingest_pb2.GetMediaRequest(media_id=args.media_id, view=view), timeout=client.timeout
        )
    _say(to_json(response) if client.json else media_details(response.media))
    return 0


async def _listed(
    page: Callable[[int, str], Awaitable[tuple[Sequence[T], str]]], limit: int | None
) -> list[T]:
    """Every item of a paged listing, or the first ``limit``; ``page(size, token)`` calls
    the listing once and gives its items and the next page's token."""
    found: list[T] = []
    page_token = ""
    while limit is None or len(found) < limit:
        wanted = _MAX_PAGE_SIZE if limit is None else min(limit - len(found), _MAX_PAGE_SIZE)
        items, page_token = await page(wanted, page_token)
        found.extend(items)
        if not page_token:
            break
    return found[:limit]


async def list_media(args: argparse.Namespace, client: ClientSettings) -> int:
    """``ls --owner ID [--status S] [--limit N]``: every page, or the first N items."""
    async with _ingest(client) as ingest:

        async def page(size: int, token: str) -> tuple[Sequence[ingest_pb2.Media], str]:
            listed = await ingest.ListMedia(
                ingest_pb2.ListMediaRequest(
                    owner_id=args.owner, status=args.status, page_size=size, page_token=token
                ),
                timeout=client.timeout,
            )
            return listed.media, listed.next_page_token

        found = await _listed(page, args.limit)
    if client.json:
        _say(json_text({"media": [to_dict(media) for media in found]}))
    elif found:
        _say(media_table(found))
    else:
        status = f"{status_name(args.status)} " if args.status else ""
        _say(f"no {status}media for owner {args.owner}")
    return 0


async def queue(args: argparse.Namespace, client: ClientSettings) -> int:
    """``queue [--watch [SECONDS]]``: the analysis queue at a glance, once or refreshed."""
    live = args.watch is not None and not client.json and sys.stdout.isatty()
    lines_drawn = 0
    async with _analysis(client) as analysis:
        while True:
            response = await analysis.GetQueueStatus(
                analysis_pb2.GetQueueStatusRequest(), timeout=client.timeout
            )
            if client.json:
                _say(to_json(response, one_line=args.watch is not None))
            elif live:
                lines_drawn = redraw(sys.stdout, queue_summary(response).splitlines(), lines_drawn)
            else:
                _say(queue_summary(response) + ("\n" if args.watch is not None else ""))
            if args.watch is None:
                return 0
            await asyncio.sleep(args.watch)


async def retry(args: argparse.Namespace, client: ClientSettings) -> int:
    """``retry (MEDIA_ID... | --failed [--owner ID])``: send items back to analysis."""
    if args.failed:
        request = ingest_pb2.ReprocessMediaRequest(
            owner_id=args.owner, status=ingest_pb2.PROCESSING_STATUS_FAILED
        )
    else:
        request = ingest_pb2.ReprocessMediaRequest(media_ids=args.media_ids)
    async with _ingest(client) as ingest:
        response = await ingest.ReprocessMedia(request, timeout=client.timeout)
    if client.json:
        _say(to_json(response))
        return 0
    _say(f"Sent {response.count} item(s) back to analysis.")
    for media_id in response.media_ids:
        _say(f"  {media_id}")
    return 0


async def pause(args: argparse.Namespace, client: ClientSettings) -> int:
    """``pause``: workers stop claiming new jobs (running ones finish)."""
    async with _analysis(client) as analysis:
        response = await analysis.PauseQueue(
            analysis_pb2.PauseQueueRequest(), timeout=client.timeout
        )
    _say(to_json(response) if client.json else _queue_state(response.paused))
    return 0


async def resume(args: argparse.Namespace, client: ClientSettings) -> int:
    """``resume``: workers claim jobs again."""
    async with _analysis(client) as analysis:
        response = await analysis.ResumeQueue(
            analysis_pb2.ResumeQueueRequest(), timeout=client.timeout
        )
    _say(to_json(response) if client.json else _queue_state(response.paused))
    return 0


def _queue_state(paused: bool) -> str:
    return "queue paused" if paused else "queue running"


# ---- webhook deliveries ----


async def webhooks(args: argparse.Namespace, client: ClientSettings) -> int:
    """``webhooks [--state S] [--endpoint NAME] [--owner ID] [--limit N]``."""
    state = (
        DELIVERY_STATES[args.state] if args.state else ingest_pb2.WEBHOOK_DELIVERY_STATE_UNSPECIFIED
    )
    async with _ingest(client) as ingest:

        async def page(size: int, token: str) -> tuple[Sequence[ingest_pb2.WebhookDelivery], str]:
            listed = await ingest.ListWebhookDeliveries(
                ingest_pb2.ListWebhookDeliveriesRequest(
                    state=state,
                    endpoint=args.endpoint,
                    owner_id=args.owner,
                    page_size=size,
                    page_token=token,
                ),
                timeout=client.timeout,
            )
            return listed.deliveries, listed.next_page_token

        found = await _listed(page, args.limit)
    if client.json:
        _say(json_text({"deliveries": [to_dict(delivery) for delivery in found]}))
    else:
        _say(delivery_table(found) if found else "no webhook deliveries waiting")
    return 0


async def retry_webhooks(args: argparse.Namespace, client: ClientSettings) -> int:
    """``retry-webhooks (DELIVERY_ID... | --endpoint NAME)``: dead deliveries sent again."""
    request = ingest_pb2.RetryWebhookDeliveriesRequest(
        delivery_ids=args.delivery_ids, endpoint=args.endpoint
    )
    async with _ingest(client) as ingest:
        response = await ingest.RetryWebhookDeliveries(request, timeout=client.timeout)
    _say(to_json(response) if client.json else f"Sent {response.count} dead delivery(ies) again.")
    return 0


Command = Callable[[argparse.Namespace, ClientSettings], Awaitable[int]]

COMMANDS: dict[str, Command] = {
    "upload": upload,
    "watch": watch,
    "get": get,
    "ls": list_media,
    "queue": queue,
    "retry": retry,
    "pause": pause,
    "resume": resume,
    "webhooks": webhooks,
    "retry-webhooks": retry_webhooks,
}


async def run_command(args: argparse.Namespace, client: ClientSettings) -> int:
    """Run the client command ``args.command``; its exit status."""
    try:
        return await COMMANDS[args.command](args, client)
    except CommandFailed as failure:
        for line in failure.lines:
            _warn(line)
        return 1
