"""``upload`` and ``watch``: the commands that follow items' analysis as it happens.

``upload --watch`` and ``watch`` read ``WatchStatus`` through :class:`ResumableWatch`, shown
redrawn in place on a terminal, a line per change into a pipe, or as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import mimetypes
import sys
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from mediatag.analysis.v1 import analysis_pb2
from mediatag.ingest.v1 import ingest_pb2

from mediatag_cli.client_calls import CommandFailed, analysis_client, ingest_client, say, warn
from mediatag_cli.progress import Display, StatusBoard
from mediatag_cli.render import change_line, media_line, to_json
from mediatag_cli.settings import ClientSettings
from mediatag_cli.watching import ResumableWatch

if TYPE_CHECKING:
    from mediatag.analysis.v1.analysis_pb2_grpc import AnalysisServiceAsyncStub

_MIB = 1024 * 1024
# Ingest lookups of ``watch --until-terminal`` in flight at once: many ids, one at a time, would
# be slow over a long round trip; all at once would crowd the service.
_LOOKUPS_IN_FLIGHT = 32


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
    async with ingest_client(client, max_message_bytes=request.ByteSize() + _MIB) as ingest:
        response = await ingest.UploadMedia(request, timeout=client.timeout)
    if client.json:
        say(to_json(response, one_line=args.watch))
    else:
        say(response.message)
        for media in response.media:
            say("  " + media_line(media))
    pending = [m for m in response.media if m.status == ingest_pb2.PROCESSING_STATUS_PENDING]
    if not args.watch or not pending:
        return 0
    return await _followanalysis_client(pending, client)


async def _followanalysis_client(items: list[ingest_pb2.Media], client: ClientSettings) -> int:
    """Watch ``items`` until each is terminal: 0 if none failed, else 1."""
    progress = StatusBoard(sys.stdout, _display(client), items)

    def until_terminal(_: int) -> analysis_pb2.WatchStatusRequest:
        # A fresh snapshot of what is left: until_terminal needs to know each item's state.
        return analysis_pb2.WatchStatusRequest(
            media_ids=progress.unfinished_ids, send_initial_state=True, until_terminal=True
        )

    notice = warn if client.json else progress.notice
    async with analysis_client(client) as analysis:
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
                    say(to_json(response, one_line=True))
                if response.HasField("change"):
                    progress.update(response.change)
                if progress.done:
                    break
    progress.finish()
    if not progress.done:
        warn("error: the analysis service ended the watch before every item was finished")
        return 1
    return 1 if progress.failed else 0


async def watch(args: argparse.Namespace, client: ClientSettings) -> int:
    """``watch [MEDIA_ID...]``: one line per status change until interrupted.

    With ``--until-terminal`` it ends once every item is terminal, whether it was before the
    watch began or became so during it: 1 if any failed, else 0. A video is done at once (not
    applicable: never analysed); an id the ingest service does not know is refused.
    """
    media_ids: list[str] = args.media_ids
    if args.until_terminal:
        media_ids = await _ids_to_wait_for(media_ids, client)
        if not media_ids:
            return 0
    request = analysis_pb2.WatchStatusRequest(
        media_ids=media_ids,
        owner_id=args.owner,
        start_revision=args.since,
        send_initial_state=args.initial,
        until_terminal=args.until_terminal,
    )
    # Only kept for --until-terminal: an endless watch of everything would grow without bound.
    latest: dict[str, int] = {}
    display = _display(client)
    board = StatusBoard(sys.stdout, display) if display is Display.LIVE else None
    notice = board.notice if board else warn
    async with analysis_client(client) as analysis:
        watcher = ResumableWatch(
            analysis,
            request,
            address=client.analysis_address,
            timeout=client.timeout,
            notice=notice,
        )
        async with aclosing(watcher.responses()) as responses:
            async for response in responses:
                if args.until_terminal and response.HasField("change"):
                    latest[response.change.media_id] = response.change.status
                if client.json:
                    say(to_json(response, one_line=True))
                elif board is not None:
                    if response.HasField("change"):
                        board.update(response.change)
                elif (line := change_line(response)) is not None:
                    say(line)
        if args.until_terminal:
            # Items that were terminal before the watch began had no change in it.
            unchanged = [media_id for media_id in media_ids if media_id not in latest]
            if unchanged:
                current = analysis_pb2.WatchStatusRequest(
                    media_ids=unchanged, owner_id=args.owner, send_initial_state=True
                )
                latest.update(await _current_statuses(analysis, current, client, notice))
    return 1 if analysis_pb2.PROCESSING_STATUS_FAILED in latest.values() else 0


async def _ids_to_wait_for(media_ids: list[str], client: ClientSettings) -> list[str]:
    """Those of ``media_ids`` whose analysis ``--until-terminal`` waits for.

    Asked of the ingest service, which knows every item from its upload on. A video is left
    out: its status is not applicable, the analysis service never hears of it. An id ingest
    does not know is refused, as nothing would end the wait for it. (One the analysis service
    does not know yet may still be on its way there from ingest's outbox: it is waited for.)
    """
    lookups = asyncio.Semaphore(_LOOKUPS_IN_FLIGHT)
    unique = list(dict.fromkeys(media_ids))
    async with ingest_client(client) as ingest:

        async def status(media_id: str) -> int | None:
            async with lookups:
                try:
                    found = await ingest.GetMedia(
                        ingest_pb2.GetMediaRequest(media_id=media_id), timeout=client.timeout
                    )
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        return None
                    raise
            return found.media.status

        answers = await asyncio.gather(*map(status, unique), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
    statuses = dict(zip(unique, answers, strict=True))
    unknown = [media_id for media_id, found in statuses.items() if found is None]
    if unknown:
        raise CommandFailed(
            [
                f"error: no media with id {media_id} at the ingest service "
                f"({client.ingest_address}): --until-terminal would wait for it for ever"
                for media_id in unknown
            ]
        )
    not_applicable = ingest_pb2.PROCESSING_STATUS_NOT_APPLICABLE
    return [media_id for media_id, found in statuses.items() if found != not_applicable]


async def _current_statuses(
    analysis: AnalysisServiceAsyncStub,
    request: analysis_pb2.WatchStatusRequest,
    client: ClientSettings,
    notice: Callable[[str], None],
) -> dict[str, int]:
    """The status of each item ``request`` (asking for the initial state) matches, now."""
    statuses: dict[str, int] = {}
    snapshot = ResumableWatch(
        analysis, request, address=client.analysis_address, timeout=client.timeout, notice=notice
    )
    async with aclosing(snapshot.responses()) as responses:
        async for response in responses:
            if response.HasField("change"):
                statuses[response.change.media_id] = response.change.status
            elif response.bookmark.initial_state_end:
                break
    return statuses


def _display(client: ClientSettings) -> Display:
    """Redrawn in place on a terminal, a line per change into a pipe, nothing with --json."""
    if client.json:
        return Display.NONE
    return Display.LIVE if sys.stdout.isatty() else Display.LINES
