"""A gRPC service holds a bounded number of connections (README, Limits): beyond
``--max-connections`` a new one is closed as soon as it is accepted, one that never finishes its
handshake or goes without a call is closed in time so that its place is taken again, and the
connections already in keep working. Each stream's HTTP/2 window is the one configured
(``--stream-window``), and a call beyond ``--max-calls`` is refused while those in go on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from ingest_service.config import IngestConfig
from mediatag_common.errors import error_info
from mediatag_common.grpc_server import channel_options, health_check_stub
from tests import media_samples as samples
from tests.conftest import PATIENCE, free_port
from tests.ingest_support import (
    OWNER,
    IngestServer,
    assert_refused,
    chunks_of,
    header,
    listed,
    refusal,
)
from tests.test_metrics import INGEST, expect, handled

# What an HTTP/2 client sends first (RFC 9113, 3.4): the preface and its SETTINGS frame.
CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
FRAME_HEADER_BYTES = 9
SETTINGS, GOAWAY = 4, 7
INITIAL_WINDOW_SIZE = 4  # a SETTINGS identifier
# Channels of one process share their connections unless each keeps its own pool: each of
# these channels is one client of its own.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)
# The timeouts the tests configure, and how soon after them a connection must be closed: twenty
# times as long (room for a loaded machine), and half the shorter default (20 s).
SHORT_TIMEOUT = 0.5
CLOSED_WITHIN = 10.0
MIB = 1024 * 1024


async def _frame_header(reader: asyncio.StreamReader, within: float = PATIENCE) -> bytes | None:
    """The next frame's header; None once the server has closed the connection."""
    try:
        return await asyncio.wait_for(reader.readexactly(FRAME_HEADER_BYTES), within)
    except asyncio.IncompleteReadError as closed:
        if closed.partial:
            raise
        return None
    except ConnectionResetError:  # closed with our preface unread
        return None


@dataclass
class RawConnection:
    """A TCP connection to the service speaking bare HTTP/2 frames."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    # The type of the server's first frame (SETTINGS when it took the connection); None if
    # it closed the connection instead.
    first_frame: int | None
    # What that frame carried: each setting's identifier and value.
    settings: dict[int, int]

    @property
    def accepted(self) -> bool:
        return self.first_frame == SETTINGS

    async def frames_until_closed(self) -> list[int]:
        """The type of every frame the server sends from now on, until it closes the
        connection (within ``CLOSED_WITHIN`` seconds)."""
        kinds = []
        while (header := await _frame_header(self.reader, CLOSED_WITHIN)) is not None:
            kinds.append(header[3])
            await self.reader.readexactly(int.from_bytes(header[:3], "big"))
        return kinds

    def close(self) -> None:
        self.writer.close()


async def raw_connection(port: int, *, preface: bool = True) -> RawConnection:
    """A connection that sends the client preface (unless not ``preface``), then nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if preface:
        writer.write(CLIENT_PREFACE)
        await writer.drain()
    # gRPC sends its SETTINGS as it takes a connection, before it has read anything.
    header = await _frame_header(reader)
    if header is None:
        return RawConnection(reader, writer, None, {})
    payload = await reader.readexactly(int.from_bytes(header[:3], "big"))
    # A SETTINGS payload is 6-byte entries: a 16-bit identifier, a 32-bit value.
    settings = {
        int.from_bytes(payload[at : at + 2], "big"): int.from_bytes(payload[at + 2 : at + 6], "big")
        for at in range(0, len(payload), 6)
    }
    return RawConnection(reader, writer, header[3], settings)


def client(port: int) -> grpc.aio.Channel:
    """A gRPC client with a connection of its own."""
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[*channel_options(), OWN_CONNECTION]
    )


async def check_health(channel: grpc.aio.Channel, *, wait_for_ready: bool = False) -> None:
    response = await health_check_stub(channel)(
        health_pb2.HealthCheckRequest(), timeout=PATIENCE, wait_for_ready=wait_for_ready
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


@asynccontextmanager
async def serving(root: Path, **settings: Any) -> AsyncIterator[int]:
    """The port of the ingest service with these connection ``settings``."""
    server = IngestServer(root / "data", config=replace(IngestConfig(), **settings))
    await server.start()
    try:
        yield server.port
    finally:
        await server.stop()


async def test_a_connection_beyond_the_bound_is_closed_and_those_in_keep_working(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path, max_connections=3) as port:
        uploader, latecomer = client(port), client(port)
        held: list[RawConnection] = []
        try:
            await check_health(uploader)
            held = [await raw_connection(port) for _ in range(2)]
            assert [connection.accepted for connection in held] == [True, True]

            beyond = await raw_connection(port)
            assert not beyond.accepted, "a fourth connection was taken"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await check_health(latecomer)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            # The connections in are served as before.
            answer = await ingest_pb2_grpc.IngestServiceStub(uploader).UploadMedia(
                ipb.UploadMediaRequest(
                    owner_id=OWNER,
                    files=[ipb.MediaFile(filename="a.jpg", content=samples.jpeg_bytes(1))],
                ),
                timeout=PATIENCE,
            )
            [uploaded] = answer.media

            # A place given up is taken again.
            held.pop().close()
            await check_health(latecomer, wait_for_ready=True)
            stub = ingest_pb2_grpc.IngestServiceStub(latecomer)
            assert await listed(stub) == [uploaded.id]
        finally:
            for connection in held:
                connection.close()
            await uploader.close()
            await latecomer.close()


async def test_a_connection_that_never_finishes_its_handshake_gives_its_place_up(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path, max_connections=1, handshake_timeout=SHORT_TIMEOUT) as port:
        silent = await raw_connection(port, preface=False)
        channel = client(port)
        try:
            assert silent.accepted
            await silent.frames_until_closed()
            # Its place is free again.
            await check_health(channel, wait_for_ready=True)
        finally:
            silent.close()
            await channel.close()


async def test_an_idle_connection_is_sent_away_and_its_client_comes_back(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path, max_connections=1, connection_idle_timeout=SHORT_TIMEOUT) as port:
        idle = await raw_connection(port)
        try:
            assert idle.accepted
            assert GOAWAY in await idle.frames_until_closed()
        finally:
            idle.close()

        first, second = client(port), client(port)
        try:
            await check_health(first)
            # The one place is first's until its connection has gone a while without a call.
            await check_health(second, wait_for_ready=True)
            # first reconnects for its next call (once second's connection is idle in turn).
            await check_health(first, wait_for_ready=True)
        finally:
            await first.close()
            await second.close()


@pytest.mark.parametrize(("settings", "window"), [({}, 64 * 1024), ({"stream_window": MIB}, MIB)])
async def test_a_stream_may_bring_the_window_the_service_announces_and_no_more(
    tmp_path: Path, settings: dict[str, int], window: int
) -> None:
    async with serving(tmp_path, **settings) as port:
        connection = await raw_connection(port)
        try:
            assert connection.settings[INITIAL_WINDOW_SIZE] == window
        finally:
            connection.close()


async def test_a_call_beyond_the_bound_is_refused_and_those_in_go_on(tmp_path: Path) -> None:
    metrics_port = free_port()
    async with serving(tmp_path, max_calls=2, metrics_port=metrics_port) as port:
        channel = client(port)
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        finish = [asyncio.Event(), asyncio.Event()]
        content = samples.jpeg_bytes(2)

        async def upload(go_on: asyncio.Event) -> AsyncIterator[ipb.UploadMediaStreamRequest]:
            yield header(filename="held.jpg")
            await go_on.wait()
            for part in chunks_of(content):
                yield part

        held = [stub.UploadMediaStream(upload(go_on), timeout=PATIENCE) for go_on in finish]
        try:
            labels = {
                "grpc_service": INGEST,
                "grpc_method": "UploadMediaStream",
                "grpc_type": "client_stream",
            }
            await expect(metrics_port, "mediatag_grpc_server_started_total", 2, **labels)
            error = await refusal(
                stub.ListMedia(ipb.ListMediaRequest(owner_id=OWNER), timeout=PATIENCE)
            )
            assert_refused(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_CALLS", None)
            info = error_info(error)
            assert info is not None
            assert info.metadata["maxCalls"] == "2"
            # Counted like any call, and health is answered all the same.
            await expect(
                metrics_port,
                "mediatag_grpc_server_handled_total",
                1,
                **handled(INGEST, "ListMedia", "RESOURCE_EXHAUSTED"),
            )
            await check_health(channel)

            # The calls in go on, and once one has ended a new call is served.
            finish[0].set()
            answer = await held[0]
            assert answer.media.filename == "held.jpg"
            assert await listed(stub) == [answer.media.id]
        finally:
            for go_on in finish:
                go_on.set()
            for call in held:
                call.cancel()
            await channel.close()
