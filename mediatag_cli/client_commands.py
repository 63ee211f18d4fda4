"""The client commands: each calls the ingest or analysis service and prints the answer.

Each command is ``async (args, client) -> exit status``; ``upload`` and ``watch``, which follow
analysis as it happens, are in ``watch_commands``. A refusal from a service ends the
command with status 1 after ``error: <CODE> <reason>: <message>`` on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence

from mediatag.analysis.v1 import analysis_pb2
from mediatag.ingest.v1 import ingest_pb2

from mediatag_cli.client_calls import (
    CommandFailed,
    analysis_client,
    every_page,
    ingest_client,
    say,
    warn,
)
from mediatag_cli.progress import redraw
from mediatag_cli.render import (
    DELIVERY_STATES,
    delivery_table,
    json_text,
    media_details,
    media_table,
    queue_summary,
    status_name,
    to_dict,
    to_json,
)
from mediatag_cli.settings import ClientSettings
from mediatag_cli.watch_commands import upload, watch


async def get(args: argparse.Namespace, client: ClientSettings) -> int:
    """``get MEDIA_ID [--embedding]``."""
    view = ingest_pb2.MEDIA_VIEW_FULL if args.embedding else ingest_pb2.MEDIA_VIEW_BASIC
    async with ingest_client(client) as ingest:
        response = await ingest.GetMedia(
            ingest_pb2.GetMediaRequest(media_id=args.media_id, view=view), timeout=client.timeout
        )
    say(to_json(response) if client.json else media_details(response.media))
    return 0


async def list_media(args: argparse.Namespace, client: ClientSettings) -> int:
    """``ls --owner ID [--status S] [--limit N]``: every page, or the first N items."""
    async with ingest_client(client) as ingest:

        async def page(size: int, token: str) -> tuple[Sequence[ingest_pb2.Media], str]:
            listed = await ingest.ListMedia(
                ingest_pb2.ListMediaRequest(
                    owner_id=args.owner, status=args.status, page_size=size, page_token=token
                ),
                timeout=client.timeout,
            )
            return listed.media, listed.next_page_token

        found = await every_page(page, args.limit)
    if client.json:
        say(json_text({"media": [to_dict(media) for media in found]}))
    elif found:
        say(media_table(found))
    else:
        status = f"{status_name(args.status)} " if args.status else ""
        say(f"no {status}media for owner {args.owner}")
    return 0


async def queue(args: argparse.Namespace, client: ClientSettings) -> int:
    """``queue [--watch [SECONDS]]``: the analysis queue at a glance, once or refreshed."""
    live = args.watch is not None and not client.json and sys.stdout.isatty()
    lines_drawn = 0
    async with analysis_client(client) as analysis:
        while True:
            response = await analysis.GetQueueStatus(
                analysis_pb2.GetQueueStatusRequest(), timeout=client.timeout
            )
            if client.json:
                say(to_json(response, one_line=args.watch is not None))
            elif live:
                lines_drawn = redraw(sys.stdout, queue_summary(response).splitlines(), lines_drawn)
            else:
                say(queue_summary(response) + ("\n" if args.watch is not None else ""))
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
    async with ingest_client(client) as ingest:
        response = await ingest.ReprocessMedia(request, timeout=client.timeout)
    if client.json:
        say(to_json(response))
        return 0
    say(f"Sent {response.count} item(s) back to analysis.")
    for media_id in response.media_ids:
        say(f"  {media_id}")
    return 0


async def pause(args: argparse.Namespace, client: ClientSettings) -> int:
    """``pause``: workers stop claiming new jobs (running ones finish)."""
    async with analysis_client(client) as analysis:
        response = await analysis.PauseQueue(
            analysis_pb2.PauseQueueRequest(), timeout=client.timeout
        )
    say(to_json(response) if client.json else _queue_state(response.paused))
    return 0


async def resume(args: argparse.Namespace, client: ClientSettings) -> int:
    """``resume``: workers claim jobs again."""
    async with analysis_client(client) as analysis:
        response = await analysis.ResumeQueue(
            analysis_pb2.ResumeQueueRequest(), timeout=client.timeout
        )
    say(to_json(response) if client.json else _queue_state(response.paused))
    return 0


def _queue_state(paused: bool) -> str:
    return "queue paused" if paused else "queue running"


# ---- webhook deliveries ----


async def webhooks(args: argparse.Namespace, client: ClientSettings) -> int:
    """``webhooks [--state S] [--endpoint NAME] [--owner ID] [--limit N]``."""
    state = (
        DELIVERY_STATES[args.state] if args.state else ingest_pb2.WEBHOOK_DELIVERY_STATE_UNSPECIFIED
    )
    async with ingest_client(client) as ingest:

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

        found = await every_page(page, args.limit)
    if client.json:
        say(json_text({"deliveries": [to_dict(delivery) for delivery in found]}))
    else:
        say(delivery_table(found) if found else "no webhook deliveries waiting")
    return 0


async def retry_webhooks(args: argparse.Namespace, client: ClientSettings) -> int:
    """``retry-webhooks (DELIVERY_ID... | --endpoint NAME)``: dead deliveries sent again."""
    request = ingest_pb2.RetryWebhookDeliveriesRequest(
        delivery_ids=args.delivery_ids, endpoint=args.endpoint
    )
    async with ingest_client(client) as ingest:
        response = await ingest.RetryWebhookDeliveries(request, timeout=client.timeout)
    say(to_json(response) if client.json else f"Sent {response.count} dead delivery(ies) again.")
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
            warn(line)
        return 1
