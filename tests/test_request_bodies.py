"""Request messages are read only once a call is admitted, within a memory budget: calls
without a valid token cost no body, large bodies in flight are bounded, and bytes that do not
parse are INVALID_ARGUMENT (issue 12, items 4 and 7)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from ingest_service.config import IngestConfig
from mediatag_common.errors import error_info
from mediatag_common.grpc_server import channel_options, open_channel
from tests.conftest import PATIENCE, Cluster, free_port
from tests.ingest_support import OWNER, IngestServer, assert_refused, listed, refusal
from tests.media_samples import jpeg_bytes
from tests.processes import Serve, peak_rss_mib, reset_peak_rss, rss_mib
from tests.test_auth import TOKENS, tokens_file
from tests.test_metrics import INGEST, expect, handled

MIB = 1024 * 1024
# Eight concurrent 100 MiB uploads: the attack of issue 12, item 4.
ATTACK_CALLS = 8
ATTACK_BYTES = 100 * MIB
# What the unread bodies of the refused calls may cost the service: the 64 KiB HTTP/2 window
# of each stream, not the bodies (README, Security), and the first calls' own allocations. With
# gRPC's bandwidth probing on, each call's 4-8 MiB window took 0 to 68 MiB here.
UNREAD_BODIES_BOUND_MIB = 16
# The default budget of request bytes in flight (two messages of 128 MiB), and what the
# process may grow by while it is full: each message is held by gRPC as it arrives, as bytes,
# decoded, and as the upload's content (README, Limits).
BYTES_IN_FLIGHT_MIB = 256
READ_BODIES_BOUND_MIB = 4 * BYTES_IN_FLIGHT_MIB


async def _attack(
    port: int, token: str | None, content: bytes
) -> list[grpc.aio.AioRpcError | ipb.UploadMediaResponse]:
    """ATTACK_CALLS concurrent UploadMedia of ``content``, each on a channel of its own. The
    channels share one connection, as a client process's do: with gRPC's bandwidth probing
    that cost the most (each call's window grew with the connection's estimate)."""
    channels = [
        open_channel(f"127.0.0.1:{port}", options=channel_options(256 * MIB), token=token)
        for _ in range(ATTACK_CALLS)
    ]
    request = ipb.UploadMediaRequest(
        owner_id="listing-7", files=[ipb.MediaFile(filename="big.jpg", content=content)]
    )

    async def one(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError | ipb.UploadMediaResponse:
        try:
            response: ipb.UploadMediaResponse = await ingest_pb2_grpc.IngestServiceStub(
                channel
            ).UploadMedia(request, timeout=PATIENCE)
            return response
        except grpc.aio.AioRpcError as error:
            return error

    try:
        return await asyncio.gather(*(one(channel) for channel in channels))
    finally:
        for channel in channels:
            await channel.close()


@pytest.mark.e2e
async def test_unauthenticated_bodies_are_never_read_and_read_ones_stay_in_budget(
    tmp_path: Path,
) -> None:
    port = free_port()
    serve = Serve(
        tmp_path / "ingest.log",
        "ingest",
        "--data-dir", str(tmp_path / "data"),
        "--ingest-port", str(port),
        "--tokens-file", str(tokens_file(tmp_path / "secrets")),
        "--ingest-metrics-port", "off",
    ).start(port)  # fmt: skip
    try:
        assert serve.process is not None
        pid = serve.process.pid
        content = bytes(ATTACK_BYTES)

        before = rss_mib(pid)
        reset_peak_rss(pid)
        results = await _attack(port, None, content)
        during = peak_rss_mib(pid)
        after = rss_mib(pid)
        print(
            f"unauthenticated: RSS {before:.0f} MiB before, {during:.0f} MiB peak, "
            f"{after:.0f} MiB after"
        )
        for result in results:
            assert isinstance(result, grpc.aio.AioRpcError)
            assert_refused(result, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING", None)
        assert during - before < UNREAD_BODIES_BOUND_MIB

        before = rss_mib(pid)
        reset_peak_rss(pid)
        results = await _attack(port, TOKENS["uploader7"], content)
        during = peak_rss_mib(pid)
        after = rss_mib(pid)
        print(
            f"authenticated: RSS {before:.0f} MiB before, {during:.0f} MiB peak, "
            f"{after:.0f} MiB after"
        )
        for result in results:
            assert isinstance(result, grpc.aio.AioRpcError)
            assert_refused(result, grpc.StatusCode.INVALID_ARGUMENT, "FILE_TOO_LARGE", None)
        assert during - before < READ_BODIES_BOUND_MIB
    finally:
        assert serve.stop() == 0


# ---- bytes that are no protobuf message (item 7) ----

# An unterminated varint: no protobuf message parses from it.
GARBAGE = b"\xff" * 16
UPLOAD_MEDIA = "/mediatag.ingest.v1.IngestService/UploadMedia"
UPLOAD_STREAM = "/mediatag.ingest.v1.IngestService/UploadMediaStream"
WATCH_STATUS = "/mediatag.analysis.v1.AnalysisService/WatchStatus"


@pytest.fixture
async def ingest(tmp_path: Path) -> AsyncIterator[IngestServer]:
    server = IngestServer(tmp_path / "ingest")
    await server.start()
    yield server
    await server.stop()


async def test_a_message_that_does_not_decode_is_invalid_argument_and_logged_once(
    ingest: IngestServer, caplog: pytest.LogCaptureFixture
) -> None:
    assert ingest.channel is not None
    caplog.set_level(logging.INFO)
    upload: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ingest.channel.unary_unary(
        UPLOAD_MEDIA
    )
    for _ in range(20):
        error = await refusal(upload(GARBAGE, timeout=PATIENCE))
        assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST", None)

    async def garbage_stream() -> AsyncIterator[bytes]:
        yield ipb.UploadMediaStreamRequest(
            header=ipb.UploadHeader(owner_id=OWNER, filename="a.jpg")
        ).SerializeToString()
        yield GARBAGE

    def streamed() -> grpc.RpcError:
        # The synchronous client reports the service's status when it ends a stream early.
        with grpc.insecure_channel(f"127.0.0.1:{ingest.port}") as channel:
            call: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(UPLOAD_STREAM)
            with pytest.raises(grpc.RpcError) as caught:
                call(iter([GARBAGE]), timeout=PATIENCE)
            return caught.value

    assert_refused(
        await asyncio.to_thread(streamed),
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
        None,
    )
    stream: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = ingest.channel.stream_unary(
        UPLOAD_STREAM
    )
    error = await refusal(stream(garbage_stream(), timeout=PATIENCE))
    assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST", None)

    # One line for the lot, no traceback; and nothing of the stream was kept.
    lines = [r for r in caplog.records if "no valid request" in r.getMessage()]
    assert len(lines) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert ingest.incoming_files() == []
    assert await listed(ingest_pb2_grpc.IngestServiceStub(ingest.channel), OWNER) == []


async def test_without_a_token_nothing_is_decoded(tmp_path: Path) -> None:
    server = IngestServer(
        tmp_path / "ingest", config=IngestConfig(tokens_file=tokens_file(tmp_path / "secrets"))
    )
    await server.start()
    try:
        assert server.channel is not None
        upload: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = server.channel.unary_unary(
            UPLOAD_MEDIA
        )
        error = await refusal(upload(GARBAGE, timeout=PATIENCE))
        assert_refused(error, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING", None)
    finally:
        await server.stop()


async def test_a_watch_request_that_does_not_decode_is_invalid_argument(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster()
    await cluster.start_analysis()
    watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = cluster.channel(
        cluster.analysis_port
    ).unary_stream(WATCH_STATUS)
    call = watch(GARBAGE, timeout=PATIENCE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert_refused(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST", None)


async def test_a_stream_its_client_cancels_after_the_header_is_counted_cancelled(
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    server = IngestServer(tmp_path / "ingest", config=IngestConfig(metrics_port=metrics_port))
    stub = await server.start()
    try:
        held = asyncio.Event()

        async def header_then_nothing() -> AsyncIterator[ipb.UploadMediaStreamRequest]:
            yield ipb.UploadMediaStreamRequest(header=ipb.UploadHeader(owner_id=OWNER))
            await held.wait()

        call = stub.UploadMediaStream(header_then_nothing(), timeout=PATIENCE)
        started = {
            "grpc_service": INGEST,
            "grpc_method": "UploadMediaStream",
            "grpc_type": "client_stream",
        }
        await expect(metrics_port, "mediatag_grpc_server_started_total", 1, **started)
        call.cancel()
        samples = await expect(
            metrics_port,
            "mediatag_grpc_server_handled_total",
            1,
            **handled(INGEST, "UploadMediaStream", "CANCELLED", "client_stream"),
        )
        invalid = handled(INGEST, "UploadMediaStream", "INVALID_ARGUMENT", "client_stream")
        assert samples.get("mediatag_grpc_server_handled_total", **invalid) is None
        assert server.incoming_files() == []
    finally:
        held.set()
        await server.stop()


async def test_calls_beyond_those_waiting_for_room_are_refused_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Room for one message being read, and for two calls waiting (of one caller: the test).
    metrics_port = free_port()
    config = IngestConfig(
        max_request_bytes_in_flight=IngestConfig().max_message_bytes,
        max_waiting_requests=2,
        max_waiting_requests_per_caller=2,
        metrics_port=metrics_port,
    )
    server = IngestServer(tmp_path / "ingest", config=config)
    stub = await server.start()
    assert server.channel is not None
    never = asyncio.Event()

    async def no_message() -> AsyncIterator[bytes]:
        await never.wait()
        yield GARBAGE

    async def started(uploads: int) -> None:
        """Until ``uploads`` UploadMedia calls have started: each waits for room, or holds it,
        as soon as it starts (the count and the wait are one step of the event loop)."""
        labels = {"grpc_service": INGEST, "grpc_method": "UploadMedia", "grpc_type": "unary"}
        await expect(metrics_port, "mediatag_grpc_server_started_total", uploads, **labels)

    # A call that never sends its message holds the room while it is awaited.
    send: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = server.channel.stream_unary(
        UPLOAD_MEDIA
    )
    holder = send(no_message(), timeout=PATIENCE)
    waiting: list[asyncio.Future[ipb.UploadMediaResponse]] = []
    try:
        await started(1)
        for seed in range(2):
            request = ipb.UploadMediaRequest(
                owner_id=OWNER,
                files=[ipb.MediaFile(filename=f"{seed}.jpg", content=jpeg_bytes(seed))],
            )
            waiting.append(asyncio.ensure_future(stub.UploadMedia(request, timeout=PATIENCE)))
            await started(2 + seed)

        # The service's metrics show what its bounds hold: the holder's room (a message being
        # read counts as the largest allowed), the calls waiting, the calls in progress.
        await expect(metrics_port, "mediatag_requests_waiting", 2)
        await expect(metrics_port, "mediatag_request_memory_bytes", config.max_message_bytes)
        await expect(metrics_port, "mediatag_grpc_server_calls_in_progress", 3)

        for _ in range(3):
            error = await refusal(
                stub.ListMedia(ipb.ListMediaRequest(owner_id=OWNER), timeout=PATIENCE)
            )
            assert_refused(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_BUSY", None)
            info = error_info(error)
            assert info is not None
            assert info.metadata["maxWaitingRequests"] == "2"
        # The operator reads which bound was met, once for the burst.
        lines = [r.getMessage() for r in caplog.records if "SERVER_BUSY" in r.getMessage()]
        assert lines == [
            "/mediatag.ingest.v1.IngestService/ListMedia refused with RESOURCE_EXHAUSTED "
            "SERVER_BUSY: too many requests are being read, and 2 more wait for room already"
        ]

        # The waiting calls are served once the room is free.
        holder.cancel()
        answers = await asyncio.gather(*waiting)
        uploaded = {answer.media[0].id for answer in answers}
        assert set(await listed(stub)) == uploaded
        await expect(metrics_port, "mediatag_requests_waiting", 0)
        await expect(metrics_port, "mediatag_request_memory_bytes", 0)
        await expect(metrics_port, "mediatag_grpc_server_calls_in_progress", 0)
    finally:
        holder.cancel()
        for call in waiting:
            call.cancel()
        await server.stop()


async def test_callers_waiting_for_room_take_turns_within_their_share(tmp_path: Path) -> None:
    # Room for one message being read, and four places to wait: two for each caller.
    metrics_port = free_port()
    config = IngestConfig(
        max_request_bytes_in_flight=IngestConfig().max_message_bytes,
        max_waiting_requests=4,
        metrics_port=metrics_port,
        tokens_file=tokens_file(tmp_path / "secrets"),
        service_token=TOKENS["service"],
    )
    server = IngestServer(tmp_path / "ingest", config=config)
    await server.start()
    app = open_channel(f"127.0.0.1:{server.port}", token=TOKENS["uploader7"])
    ops = open_channel(f"127.0.0.1:{server.port}", token=TOKENS["admin"])
    never = asyncio.Event()

    async def no_message() -> AsyncIterator[bytes]:
        await never.wait()
        yield GARBAGE

    async def started(uploads: int) -> None:
        labels = {"grpc_service": INGEST, "grpc_method": "UploadMedia", "grpc_type": "unary"}
        await expect(metrics_port, "mediatag_grpc_server_started_total", uploads, **labels)

    def upload(channel: grpc.aio.Channel, name: str) -> asyncio.Future[ipb.UploadMediaResponse]:
        request = ipb.UploadMediaRequest(
            owner_id=OWNER,
            files=[ipb.MediaFile(filename=f"{name}.jpg", content=jpeg_bytes(len(name)))],
        )
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        return asyncio.ensure_future(stub.UploadMedia(request, timeout=PATIENCE))

    send: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = app.stream_unary(UPLOAD_MEDIA)
    holder = send(no_message(), timeout=PATIENCE)
    waiting: dict[str, asyncio.Future[ipb.UploadMediaResponse]] = {}
    try:
        await started(1)
        # The app's two calls take its share of the places to wait: a third is refused.
        for number, name in enumerate(("app-1", "app-2")):
            waiting[name] = upload(app, name)
            await started(2 + number)
        error = await refusal(upload(app, "app-refused"))
        assert_refused(
            error, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WAITING_REQUESTS_FOR_CALLER", None
        )
        info = error_info(error)
        assert info is not None
        assert info.metadata["maxWaitingRequestsPerCaller"] == "2"
        # Another caller still waits, and is served in its turn, not after all of the app's.
        waiting["ops"] = upload(ops, "ops")
        await started(5)

        holder.cancel()
        answers = {name: (await call).media[0].id for name, call in waiting.items()}
        stored_newest_first = await listed(ingest_pb2_grpc.IngestServiceStub(ops))
        assert stored_newest_first == [answers["app-2"], answers["ops"], answers["app-1"]]
    finally:
        holder.cancel()
        for call in waiting.values():
            call.cancel()
        await app.close()
        await ops.close()
        await server.stop()
