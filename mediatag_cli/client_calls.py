"""How a client command reaches a service and answers: channels to ingest and analysis (TLS
and token as configured), a failed call as :class:`CommandFailed`, every page of a listing,
and printing what a service sent (escaped).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar

import grpc
from mediatag.analysis.v1 import analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2_grpc

from mediatag_cli.render import rpc_error_lines
from mediatag_cli.settings import ClientSettings
from mediatag_common.grpc_server import channel_options, open_channel
from mediatag_common.untrusted_text import escaped

if TYPE_CHECKING:
    from mediatag.analysis.v1.analysis_pb2_grpc import AnalysisServiceAsyncStub
    from mediatag.ingest.v1.ingest_pb2_grpc import IngestServiceAsyncStub

T = TypeVar("T")
# The largest page a listing asks for (ListMedia's largest).
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
async def ingest_client(
    client: ClientSettings, max_message_bytes: int | None = None
) -> AsyncIterator[IngestServiceAsyncStub]:
    async with _channel("ingest", client.ingest_address, client, max_message_bytes) as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel)


@asynccontextmanager
async def analysis_client(client: ClientSettings) -> AsyncIterator[AnalysisServiceAsyncStub]:
    async with _channel("analysis", client.analysis_address, client, None) as channel:
        yield analysis_pb2_grpc.AnalysisServiceStub(channel)


def say(text: str) -> None:
    # Escaped whole too: a field the renderers did not mark as untrusted still cannot
    # reach the terminal as a control sequence.
    print(escaped(text, keep="\n"), flush=True)


def warn(text: str) -> None:
    print(escaped(text, keep="\n"), file=sys.stderr, flush=True)


async def every_page(
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
