"""The web gateway's bounds in size and time (README, "The web gateway"): a batch of up to
128 MiB is one upload, a form's fields are bounded, a client that stops sending or reading and
a service that stops answering are let go, each with its refusal (or, once a response has
started, a cut connection), and what they held is free again. A service out of reach is a
fixed refusal that names no address.

A service that hangs or fails in the middle of a call is a real one behind :class:`Relay`, a
TCP relay that stops carrying bytes or cuts its connections, as a network would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from mediatag.ingest.v1 import ingest_pb2 as ipb

from analysis_service.config import AnalysisConfig, RateLimitConfig, WatchConfig
from analysis_service.errors import PermanentAnalyzerError
from ingest_service.config import IngestConfig
from tests.conftest import Cluster, free_port, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.media_samples import jpeg_bytes, mp4_bytes, png_bytes
from tests.test_metrics import scrape
from tests.test_pipeline import upload, wait_terminal
from tests.test_watch_scale import fast_cluster, small_images
from tests.test_web_api import error_info, violated_fields
from tests.web_support import Gateways, Web, form, web_config
from web_gateway.config import EventsConfig

MIB = 1024 * 1024
# The time limits under test, far below the tests' waits.
SHORT = 0.5
# A service's time to answer in these tests: generous for a loaded machine.
CALL_TIMEOUT = 2.0
# What must happen within this, long after the limit under test and long before the default
# one (a minute or more).
WITHIN = 15.0
BOUNDARY = "limits-test-boundary"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


class Relay:
    """A TCP relay to ``127.0.0.1:target``: the network between the gateway and a service.
    ``freeze`` stops it carrying bytes (the service seems to hang), ``thaw`` resumes, ``cut``
    breaks every connection it carries (the service seems to fail)."""

    def __init__(self, target: int) -> None:
        self._target = target
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._transports: list[asyncio.WriteTransport] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        for transport in self._transports:
            transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.thaw()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
            self._transports += [writer.transport, up_writer.transport]
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(64 * 1024):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()


@pytest.fixture
async def relays() -> AsyncIterator[Callable[[int], Awaitable[Relay]]]:
    """A factory of started relays (``await relays(port)``), all closed after the test."""
    made: list[Relay] = []

    async def make(target: int) -> Relay:
        relay = Relay(target)
        await relay.start()
        made.append(relay)
        return relay

    yield make
    for relay in made:
        await relay.close()


def metrics_cluster(make_cluster: Callable[..., Cluster]) -> tuple[Cluster, int]:
    """A cluster whose ingest serves metrics, and their port."""
    port = free_port()
    return make_cluster(ingest_config=IngestConfig(metrics_port=port)), port


async def ingest_calls(metrics_port: int, count: int) -> None:
    """Wait until ingest serves ``count`` calls (streams included), within :data:`WITHIN`."""

    async def serving() -> bool:
        samples = await scrape(metrics_port)
        return samples.get("mediatag_grpc_server_calls_in_progress") == count

    await wait_until(serving, within=WITHIN)


async def status_on_a_new_connection(web: Web, path: str = "/api/v1/throughput") -> int | None:
    """The status of ``GET path`` on a connection of its own; None if it was closed first."""
    try:
        async with (
            aiohttp.ClientSession() as client,
            client.get(web.url + path) as response,
        ):
            return response.status
    except aiohttp.ClientConnectionError:
        return None


async def served_on_a_new_connection(web: Web) -> None:
    async def served() -> bool:
        return await status_on_a_new_connection(web) == 200

    await wait_until(served, within=WITHIN)


def field_part(name: str, value: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
    ).encode()


def file_part_head(filename: str, content_type: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()


async def never_ending(start: bytes, never: asyncio.Event) -> AsyncIterator[bytes]:
    """A request body that sends ``start``, then nothing more."""
    yield start
    await never.wait()


async def test_a_batch_up_to_128_mib_is_one_upload_and_a_form_past_it_is_streamed(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster = make_cluster()
    await cluster.start_analysis()
    await cluster.start_ingest()
    web = await gateways.start(web_config(cluster))
    limit = web.host.gateway.config.max_batch_upload_bytes
    assert limit == 128 * MIB

    context = [f"note{n}=" + "x" * 1000 for n in range(3)]
    for fields, payload in (
        # Over gRPC's usual cap on a message (64 MiB), within the batch the gateway holds.
        ({}, 100 * MIB),
        # Within the bound alone, past it with the form's fields: streamed.
        ({"context": context}, limit - 2048),
        # Past it alone: streamed, what the gateway held of it too in messages within
        # ingest's cap on one.
        ({}, limit + MIB),
    ):
        video = mp4_bytes(payload % 7, payload_bytes=payload)
        answer = await web.ok(
            "POST",
            "/api/v1/media",
            data=form({"owner_id": "large", **fields}, [("v.mp4", video, "video/mp4")]),
        )
        (media,) = answer["media"]
        assert (media["sizeBytes"], media["sha256"]) == (
            str(len(video)),
            hashlib.sha256(video).hexdigest(),
        )
        # Over 100 MiB each: one at a time.
        del video


async def test_a_form_has_at_most_64_fields_and_the_65th_is_refused_as_it_comes(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster = fast_cluster(make_cluster, WatchConfig())
    await cluster.start_analysis()
    await cluster.start_ingest()
    web = await gateways.start(web_config(cluster, max_concurrent_uploads=1))
    # What ingest takes goes through: 32 context entries beside the other fields.
    entries = [f"k{n}=v" for n in range(32)]
    answer = await web.ok(
        "POST",
        "/api/v1/media",
        data=form(
            {"owner_id": "fields", "category": "Hair", "context": entries},
            [("a.jpg", jpeg_bytes(1), "image/jpeg")],
        ),
    )
    assert answer["count"] == 1

    # A body of field after field, without end, is refused at the 65th: the gateway holds
    # no more than 64 of them.
    async def fields_without_end() -> AsyncIterator[bytes]:
        n = 0
        while True:
            yield field_part("context", f"k{n}=" + "v" * 1000)
            n += 1

    async with asyncio.timeout(WITHIN):
        status, refused = await web.json(
            "POST", "/api/v1/media", data=fields_without_end(), headers=MULTIPART
        )
    assert (status, error_info(refused)["reason"], violated_fields(refused)) == (
        400,
        "TOO_MANY_FIELDS",
        ["context"],
    )
    assert error_info(refused)["metadata"] == {}
    assert web.host.gateway.uploads_in_progress == 0
    # Its place is free again (there is one).
    await web.ok(
        "POST",
        "/api/v1/media",
        data=form({"owner_id": "fields"}, [("b.jpg", jpeg_bytes(2), "image/jpeg")]),
    )


async def test_idle_connections_and_slow_headers_are_closed_after_the_keepalive_timeout(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster = fast_cluster(make_cluster, WatchConfig())
    await cluster.start_analysis()
    await cluster.start_ingest()
    web = await gateways.start(web_config(cluster, max_connections=4, keepalive_timeout=SHORT))
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        # Silent; half a request line; half the headers; a request answered, then silence.
        for sent in (
            b"",
            b"GET /api/v1/throughput HTTP/1.1\r\n",
            b"GET /api/v1/throughput HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",
            b"GET /api/v1/throughput HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
            writer.write(sent)
            await writer.drain()
            held.append((reader, writer))
        answered = await held[3][0].readuntil(b"\r\n\r\n")
        assert answered.startswith(b"HTTP/1.1 200")

        # Each is closed by the gateway: nothing more comes, then the end.
        async with asyncio.timeout(WITHIN):
            for reader, _ in held[:3]:
                assert await reader.read() == b""
            length = int(answered.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert len(await held[3][0].read()) == length
    finally:
        for _, writer in held:
            writer.close()
    # The places are free again.
    await served_on_a_new_connection(web)


async def test_an_upload_that_stops_sending_is_refused_and_gives_its_place_back(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster, metrics_port = metrics_cluster(make_cluster)
    await cluster.start_analysis()
    await cluster.start_ingest()
    web = await gateways.start(
        web_config(
            cluster,
            upload_idle_timeout=SHORT,
            max_concurrent_uploads=1,
            max_batch_upload_bytes=100_000,
        )
    )
    image = png_bytes(seed=6, size=(640, 480))
    start = field_part("owner_id", "stalled") + file_part_head("s.png", "image/png")
    never = asyncio.Event()
    # Stalled while the file is held, then while it is streamed to ingest (sent past the
    # bound: all but its end).
    for sent, streams in ((1000, 0), (len(image) - 100, 1)):
        async with asyncio.timeout(WITHIN):
            status, refused = await web.json(
                "POST",
                "/api/v1/media",
                data=never_ending(start + image[:sent], never),
                headers=MULTIPART,
            )
        assert (status, refused["code"], error_info(refused)["reason"]) == (
            504,
            4,  # DEADLINE_EXCEEDED
            "UPLOAD_STALLED",
        )
        assert error_info(refused)["metadata"] == {}
        assert web.host.gateway.uploads_in_progress == 0
        started = (await scrape(metrics_port)).get(
            "mediatag_grpc_server_started_total",
            grpc_service="mediatag.ingest.v1.IngestService",
            grpc_method="UploadMediaStream",
            grpc_type="client_stream",
        )
        assert (started or 0) == streams
        # The stream to ingest ended with the upload.
        await ingest_calls(metrics_port, 0)

    answer = await web.ok(
        "POST", "/api/v1/media", data=form({"owner_id": "after"}, [("a.png", image, "")])
    )
    assert answer["media"][0]["sizeBytes"] == str(len(image))
    assert (await web.ok("GET", "/api/v1/media?owner_id=stalled"))["media"] == []


async def test_a_service_that_stops_answering_is_refused_and_the_upload_place_freed(
    make_cluster: Callable[..., Cluster],
    gateways: Gateways,
    relays: Callable[[int], Awaitable[Relay]],
) -> None:
    cluster = fast_cluster(make_cluster, WatchConfig())
    await cluster.start_analysis()
    await cluster.start_ingest()
    relay = await relays(cluster.ingest_port)
    web = await gateways.start(
        web_config(
            cluster,
            ingest_address=f"127.0.0.1:{relay.port}",
            call_timeout=CALL_TIMEOUT,
            max_concurrent_uploads=1,
            max_batch_upload_bytes=100_000,
        )
    )
    video = mp4_bytes(3, payload_bytes=MIB)
    uploaded = await web.ok(
        "POST", "/api/v1/media", data=form({"owner_id": "o"}, [("v.mp4", video, "video/mp4")])
    )
    media_id = uploaded["media"][0]["id"]
    # Streamed: past the batch's bound.
    large = png_bytes(seed=6, size=(640, 480))

    def stream_upload() -> aiohttp.FormData:
        return form({"owner_id": "streamed"}, [("large.png", large, "image/png")])

    relay.freeze()
    async with asyncio.timeout(WITHIN):
        answers = await asyncio.gather(
            web.json("GET", f"/api/v1/media/{media_id}"),
            web.json("GET", f"/api/v1/media/{media_id}/content"),
            web.json("POST", "/api/v1/media", data=stream_upload()),
        )
    for status, refused in answers:
        assert (status, refused["code"], error_info(refused)) == (
            504,
            4,  # DEADLINE_EXCEEDED
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "INGEST_TIMEOUT",
                "domain": "mediatag",
                "metadata": {},
            },
        )
        assert refused["message"] == "the ingest service did not answer in time"
    assert web.host.gateway.uploads_in_progress == 0

    relay.thaw()
    async with web.client.get(f"{web.url}/api/v1/media/{media_id}/content") as response:
        assert (response.status, await response.read()) == (200, video)
    answer = await web.ok("POST", "/api/v1/media", data=stream_upload())
    assert answer["media"][0]["sha256"] == hashlib.sha256(large).hexdigest()


async def read_head(reader: asyncio.StreamReader) -> int:
    """Read a response's status line and headers; its Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])


async def test_content_cut_off_by_the_service_ends_the_connection_short_of_its_length(
    make_cluster: Callable[..., Cluster],
    gateways: Gateways,
    relays: Callable[[int], Awaitable[Relay]],
) -> None:
    cluster = fast_cluster(make_cluster, WatchConfig())
    await cluster.start_analysis()
    await cluster.start_ingest()
    relay = await relays(cluster.ingest_port)
    web = await gateways.start(web_config(cluster, ingest_address=f"127.0.0.1:{relay.port}"))
    # Far more than the sockets and windows on the way hold.
    video = mp4_bytes(4, payload_bytes=24 * MIB)
    (media,) = (await upload(cluster, [ipb.MediaFile(filename="v.mp4", content=video)])).media

    reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
    try:
        writer.write(
            f"GET /api/v1/media/{media.id}/content HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        assert await read_head(reader) == len(video)
        relay.cut()
        received = bytearray()
        async with asyncio.timeout(WITHIN):
            with contextlib.suppress(ConnectionResetError):
                while chunk := await reader.read(MIB):
                    received += chunk
    finally:
        writer.close()
    # The bytes that came are the content's, and nothing else (no second response in them).
    assert 0 < len(received) < len(video)
    assert received == video[: len(received)]

    relay.thaw()
    async with web.client.get(f"{web.url}/api/v1/media/{media.id}/content") as response:
        assert (response.status, await response.read() == video) == (200, True)


async def connect_without_reading(port: int, request: bytes) -> socket.socket:
    """A connection that sends ``request`` and reads nothing (a small receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request)
    return sock


async def read_to_end(sock: socket.socket) -> int:
    """How many bytes come until the peer closes."""
    loop = asyncio.get_running_loop()
    total = 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := await loop.sock_recv(sock, MIB):
            total += len(chunk)
    return total


async def test_content_a_client_does_not_read_ends_its_call_and_connection(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster, metrics_port = metrics_cluster(make_cluster)
    await cluster.start_analysis()
    await cluster.start_ingest()
    # One connection: the reader's; it must be given back for anyone else to get in.
    web = await gateways.start(
        web_config(cluster, content_write_timeout=CALL_TIMEOUT, max_connections=1)
    )
    video = mp4_bytes(5, payload_bytes=32 * MIB)
    (media,) = (await upload(cluster, [ipb.MediaFile(filename="v.mp4", content=video)])).media

    request = f"GET /api/v1/media/{media.id}/content HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sock = await connect_without_reading(web.port, request.encode())
    try:
        await ingest_calls(metrics_port, 1)
        # Past the write timeout, the gateway ends the call and closes the connection.
        await ingest_calls(metrics_port, 0)
        await served_on_a_new_connection(web)
        async with asyncio.timeout(WITHIN):
            assert await read_to_end(sock) < len(video)
    finally:
        sock.close()

    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{web.url}/api/v1/media/{media.id}/content") as response,
    ):
        assert (response.status, await response.read() == video) == (200, True)


async def test_an_event_stream_a_client_does_not_read_is_closed_after_the_write_timeout(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    # Each job fails with a long error: events of 100 KB, so that a few dozen are more than
    # a connection's buffers hold (the kernel's grow to megabytes).
    images = small_images(40, first_seed=0)
    failing = PermanentAnalyzerError("x" * 100_000)
    analyzer = ScriptedAnalyzer(
        dimensions=64,
        fail_always={hashlib.sha256(image.content).hexdigest(): failing for image in images},
    )
    cluster = make_cluster(
        analyzer=analyzer,
        analysis_config=AnalysisConfig(
            embedding_dimensions=64, rate_limits={"local": RateLimitConfig(1000, 100)}
        ),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    web = await gateways.start(
        web_config(cluster, max_connections=1, events=EventsConfig(write_timeout=SHORT))
    )
    media_ids = [
        media.id
        for batch in (images[:20], images[20:])
        for media in (await upload(cluster, batch, owner="many")).media
    ]
    await wait_terminal(cluster, media_ids)

    # Every change after the log's first.
    head = ["GET /api/v1/events?owner_id=many HTTP/1.1", "Host: 127.0.0.1", "Last-Event-ID: 1"]
    request = "\r\n".join([*head, "", ""]).encode()
    sock = await connect_without_reading(web.port, request)
    try:

        async def streams(count: int) -> bool:
            return web.host.gateway.watches.streams == count

        # The gateway's own watch, and this one until its write times out.
        await wait_until(lambda: streams(2), within=WITHIN)
        await wait_until(lambda: streams(1), within=WITHIN)
        # Its connection is closed too: its place is free.
        await served_on_a_new_connection(web)
        async with asyncio.timeout(WITHIN):
            await read_to_end(sock)
    finally:
        sock.close()


async def test_a_service_out_of_reach_is_a_fixed_refusal_naming_no_address(
    make_cluster: Callable[..., Cluster], gateways: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="web_gateway.upstream")
    cluster = fast_cluster(make_cluster, WatchConfig())
    # Not started yet: nothing listens on its ports.
    web = await gateways.start(web_config(cluster))
    for path, service in (
        ("/api/v1/media?owner_id=a", "ingest"),
        ("/api/v1/media/x/content", "ingest"),
        ("/api/v1/queue", "analysis"),
        ("/api/v1/events", "analysis"),
    ):
        async with web.client.get(web.url + path) as response:
            status, text = response.status, await response.text()
            refused = await response.json()
        assert (status, refused) == (
            503,
            {
                "code": 14,  # UNAVAILABLE
                "message": f"the {service} service is unavailable; try again shortly",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": f"{service.upper()}_UNAVAILABLE",
                        "domain": "mediatag",
                        "metadata": {},
                    }
                ],
            },
        ), path
        assert "127.0.0.1" not in text
    # The operator reads the cause.
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert f"127.0.0.1:{cluster.ingest_port}" in logged
    assert f"127.0.0.1:{cluster.analysis_port}" in logged

    await cluster.start_analysis()
    await cluster.start_ingest()

    async def answered() -> bool:
        status, _ = await web.json("GET", "/api/v1/media?owner_id=a")
        queue_status, _ = await web.json("GET", "/api/v1/queue")
        return (status, queue_status) == (200, 200)

    await wait_until(answered)
