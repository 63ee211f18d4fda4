"""``upload`` and ``watch``: the commands that follow items' analysis as it happens.

``upload --watch`` and ``watch`` read ``WatchStatus`` through :class:`ResumableWatch`, shown
redrawn in place on a terminal, a line per change into a pipe, or as JSON.
"""

from __future__ import annotations

import argparse
import mimetypes
import sys
from contextlib import aclosing
from pathlib import Path

from mediatag.analysis.v1 import analysis_pb2
from mediatag.ingest.v1 import ingest_pb2

from mediatag_cli.client_calls import CommandFailed, analysis_client, ingest_client, say, warn
from mediatag_cli.progress import Display, StatusBoard
from mediatag_cli.render import change_line, media_line, to_json
from mediatag_cli.settings import ClientSettings
from mediatag_cli.watching import ResumableWatch

_MIB = 1024 * 1024


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
    async with analysis_client(client) as analysis:
        watcher = ResumableWatch(
            analysis,
            request,
            address=client.analysis_address,
            timeout=client.timeout,
            notice=board.notice if board else warn,
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
    return 1 if analysis_pb2.PROCESSING_STATUS_FAILED in latest.values() else 0


def _display(client: ClientSettings) -> Display:
    """Redrawn in place on a terminal, a line per change into a pipe, nothing with --json."""
    if client.json:
        return Display.NONE
    return Display.LIVE if sys.stdout.isatty() else Display.LINES
