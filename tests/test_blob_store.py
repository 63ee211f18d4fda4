"""The blob store on each backend: the sweep of a crash's leftovers, its race with a
re-upload of the same bytes, a store that stops answering, an aborted multipart upload, two
replicas sharing a bucket, and how each client's refusals are told apart."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)
from google.api_core import exceptions as api_exceptions
from google.auth.exceptions import DefaultCredentialsError
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from bench.emulators import AWS_TEST_ENVIRONMENT
from ingest_service.blobstores.gcs import GcsBucket
from ingest_service.blobstores.local import LocalBlobStore
from ingest_service.blobstores.s3 import S3Bucket
from ingest_service.blobstores.spool import PREFIX as SPOOL_PREFIX
from ingest_service.config import IngestConfig, UploadLimits
from ingest_service.domain.observer import NoObserver
from ingest_service.domain.requests import RequestIds
from ingest_service.domain.uploads import Uploads
from ingest_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from ingest_service.storage.sql_store import SqlIngestStore
from mediatag_common.database import Database, sqlite_url
from mediatag_common.service_config import MIB
from tests import media_samples as samples
from tests.blob_stores import BUCKET, StoreUnderTest, blob_key, s3_client, store_under_test
from tests.conftest import PATIENCE, free_port, wait_until
from tests.ingest_support import (
    IngestServer,
    assert_refused,
    chunks_of,
    header,
    listed,
    refusal,
    sha256_of,
    upload_stream,
)
from tests.processes import MEDIATAG, Serve, run_cli

OWNER = "listing-7"
T = TypeVar("T")
# Sweeps often, and judges anything older than a moment.
QUICK_SWEEP = IngestConfig(
    blob_sweep_grace=0.05, blob_sweep_temporary_grace=0.05, blob_sweep_interval=0.05
)


def upload(*contents: bytes) -> ipb.UploadMediaRequest:
    return ipb.UploadMediaRequest(
        owner_id=OWNER,
        files=[ipb.MediaFile(filename=f"{i}.jpg", content=c) for i, c in enumerate(contents)],
    )


async def read_back(stub: ingest_pb2_grpc.IngestServiceAsyncStub, media_id: str) -> bytes:
    request = ipb.ReadMediaContentRequest(media_id=media_id)
    return b"".join([c.data async for c in stub.ReadMediaContent(request, timeout=10)])


@pytest.fixture
async def quick_sweeper(tmp_path: Path, blob_store: StoreUnderTest) -> AsyncIterator[IngestServer]:
    runner = IngestServer(tmp_path / "ingest", config=QUICK_SWEEP, store=blob_store)
    yield runner
    await runner.stop()


async def test_the_sweep_removes_what_no_row_names_and_keeps_what_rows_name(
    quick_sweeper: IngestServer,
) -> None:
    server = quick_sweeper
    stub = await server.start()
    named = samples.jpeg_bytes(1)
    answer = await stub.UploadMedia(upload(named), timeout=PATIENCE)
    # What a crash between a blob and its row leaves, and a stream's temporary object.
    orphan = samples.jpeg_bytes(2)
    server.blobs.write(blob_key(sha256_of(orphan)), orphan)
    if server.blobs.scheme != "file":
        server.blobs.write("incoming/0123456789abcdef", b"half a stream")
    # Not the store's: left alone.
    server.blobs.write("notes/readme.txt", b"an operator's file")

    async def swept() -> bool:
        return server.blob_files() == {server.blob(sha256_of(named)), "notes/readme.txt"}

    await wait_until(swept)
    assert await read_back(stub, answer.media[0].id) == named


async def test_a_reupload_racing_the_sweep_keeps_its_blob(
    quick_sweeper: IngestServer, seed: int
) -> None:
    """An orphan blob, judged by a sweep every 50 ms, uploaded again meanwhile: whichever
    comes first, the blob a row names is there when the upload answers, and stays."""
    chance = random.Random(seed)
    server = quick_sweeper
    stub = await server.start()
    contents = [samples.jpeg_bytes(100 + n) for n in range(16)]
    for content in contents:
        server.blobs.write(blob_key(sha256_of(content)), content)

    async def upload_again(content: bytes) -> ipb.Media:
        # Around the moment the orphan becomes old enough to be judged (a second and the
        # grace period: stores tell the time to the second), a different one for each.
        await asyncio.sleep(chance.uniform(0.9, 1.6))
        media: ipb.Media = (await stub.UploadMedia(upload(content), timeout=PATIENCE)).media[0]
        assert server.blob(media.sha256) in server.blob_files()
        return media

    answered = await asyncio.gather(*(upload_again(content) for content in contents))
    # A sweep that began after the last answer (it removed a new orphan) kept them all.
    marker = samples.jpeg_bytes(99)
    server.blobs.write(blob_key(sha256_of(marker)), marker)

    async def marker_swept() -> bool:
        return server.blob(sha256_of(marker)) not in server.blob_files()

    await wait_until(marker_swept)
    for media in answered:
        assert hashlib.sha256(await read_back(stub, media.id)).hexdigest() == media.sha256


async def test_a_blob_swept_before_its_row_committed_is_stored_again(tmp_path: Path) -> None:
    """The rare order of that race, made to happen: the upload found the blob stored, the
    sweep removed it before the row committed; once committed, the upload stores it again."""
    store = LocalBlobStore(tmp_path / "blobs", NoObserver())
    db = Database(sqlite_url(str(tmp_path / "ingest.db")))
    await db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    ingest_store = SqlIngestStore(db)
    uploads = Uploads(
        store=ingest_store,
        blobs=store,
        limits=UploadLimits(),
        requests=RequestIds(store=ingest_store, retention=60, purge_interval=60),
        on_committed=lambda: None,
        blob_grace_period=3600,
    )
    content = samples.jpeg_bytes(5)
    sha256 = sha256_of(content)
    try:
        assert not (await store.put(sha256, content)).reused
        found = await store.put(sha256, content)
        assert found.reused
        await store.delete(blob_key(sha256))

        await uploads.keep_blob(sha256, found, lambda: store.put(sha256, content))

        assert store.path_for(sha256).read_bytes() == content
    finally:
        await uploads.close()
        await db.close()


async def test_a_blob_the_store_lost_is_data_loss_not_an_outage(
    tmp_path: Path, blob_store: StoreUnderTest
) -> None:
    """A row naming a blob the store no longer holds: reading it is refused for good
    (DATA_LOSS, BLOB_MISSING), not as an outage a client would retry; a batched read leaves
    it to that refusal and still answers the others."""
    server = IngestServer(tmp_path / "ingest", store=blob_store)
    stub = await server.start()
    try:
        lost, kept = samples.jpeg_bytes(31), samples.jpeg_bytes(32)
        answer = await stub.UploadMedia(upload(lost, kept), timeout=PATIENCE)
        lost_id, kept_id = (m.id for m in answer.media)
        server.blobs.delete(blob_key(sha256_of(lost)))

        error = await refusal(read_back(stub, lost_id))
        assert_refused(error, grpc.StatusCode.DATA_LOSS, "BLOB_MISSING", None)
        assert BUCKET not in (error.details() or "")
        batch = await stub.ReadMediaContents(
            ipb.ReadMediaContentsRequest(media_ids=[lost_id, kept_id]), timeout=PATIENCE
        )
        states = [(item.media_id, item.state, item.data) for item in batch.contents]
        assert states == [
            (lost_id, ipb.MEDIA_CONTENT_STATE_READ_SEPARATELY, b""),
            (kept_id, ipb.MEDIA_CONTENT_STATE_INCLUDED, kept),
        ]
    finally:
        await server.stop()


# -- a store that stops answering ------------------------------------------------------------


async def once_the_store_answers(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``'s result, trying again while it is refused with STORAGE_UNAVAILABLE."""
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            assert_refused(error, grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE", None)
            assert time.monotonic() < deadline, "the store did not answer again"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("scheme", ["gs", "s3"])
async def test_a_store_that_stops_answering_fails_uploads_cleanly_until_it_returns(
    request: pytest.FixtureRequest, tmp_path: Path, scheme: str
) -> None:
    store = store_under_test(request, scheme, tmp_path / "unused")
    assert store.emulator is not None
    server = IngestServer(
        tmp_path / "ingest", config=IngestConfig(blob_store_timeout=1.0), store=store
    )
    try:
        stub = await server.start()
        image, video = samples.jpeg_bytes(3), samples.mp4_bytes(payload_bytes=MIB)
        with store.emulator.stopped():
            for call in (
                stub.UploadMedia(upload(image), timeout=PATIENCE),
                upload_stream(stub, video, deadline=PATIENCE, filename="clip.mp4"),
            ):
                error = await refusal(call)
                assert_refused(error, grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE", None)
                # Clients read no bucket, prefix or endpoint.
                details = error.details() or ""
                assert BUCKET not in details
                assert store.prefix not in details
                assert "127.0.0.1" not in details
            assert await listed(stub) == []
        # Back: nothing half-stored, and uploads go through again. Each store call still has
        # the 1 s timeout, which the emulator, working off what it held, can miss on a loaded
        # machine: until then a call is refused the same clean way, and is tried again.
        assert server.blob_files() == set()
        assert server.incoming_files() == []
        answer = await once_the_store_answers(lambda: stub.UploadMedia(upload(image)))
        read = await once_the_store_answers(lambda: read_back(stub, answer.media[0].id))
        assert read == image
        streamed = await once_the_store_answers(
            lambda: upload_stream(stub, video, filename="clip.mp4")
        )
        read = await once_the_store_answers(lambda: read_back(stub, streamed.media.id))
        assert read == video
        assert server.incoming_files() == []
    finally:
        await server.stop()


async def test_a_cancelled_multipart_upload_is_aborted_and_leaves_no_object(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """On S3: gcp-storage-emulator answers 501 to cancelling a resumable upload (an
    unfinished one is no object there either)."""
    store = store_under_test(request, "s3", tmp_path / "unused")
    assert store.emulator is not None
    server = IngestServer(
        tmp_path / "ingest",
        config=IngestConfig(limits=UploadLimits(max_video_bytes=64 * MIB)),
        store=store,
    )
    hold = asyncio.Event()
    content = samples.mp4_bytes(payload_bytes=16 * MIB)
    s3 = s3_client(store.emulator)

    def multipart_uploads() -> list[str]:
        found = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{store.prefix}/")
        return [upload["Key"] for upload in found.get("Uploads", [])]

    async def two_parts_then_wait() -> AsyncIterator[ipb.UploadMediaStreamRequest]:
        for message in [header(filename="clip.mp4"), *chunks_of(content[: 12 * MIB])]:
            yield message
        await hold.wait()

    try:
        stub = await server.start()
        call = stub.UploadMediaStream(two_parts_then_wait(), timeout=PATIENCE)

        async def parts_sent() -> bool:
            return bool(multipart_uploads())

        await wait_until(parts_sent)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

        async def aborted() -> bool:
            return not multipart_uploads() and server.incoming_files() == []

        await wait_until(aborted)
        assert server.blob_files() == set()
        assert await listed(stub) == []
    finally:
        hold.set()
        await server.stop()


# -- replicas --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["gs", "s3"])
async def test_what_one_replica_stores_the_other_reads(
    request: pytest.FixtureRequest, tmp_path: Path, scheme: str
) -> None:
    """Two ingest processes on their own machines (data directories), one database, one
    bucket; on SQLite one after the other."""
    store = store_under_test(request, scheme, tmp_path / "unused")
    shared = IngestConfig(database_url=sqlite_url(str(tmp_path / "shared.db")))
    first = IngestServer(tmp_path / "first", config=shared, store=store)
    second = IngestServer(tmp_path / "second", config=shared, store=store)
    image, video = samples.jpeg_bytes(8), samples.mp4_bytes(payload_bytes=6 * MIB)
    try:
        stub = await first.start()
        uploaded = (await stub.UploadMedia(upload(image), timeout=PATIENCE)).media[0]
        streamed = (await upload_stream(stub, video, filename="clip.mp4")).media
        await first.stop()

        stub = await second.start()
        assert await read_back(stub, uploaded.id) == image
        assert await read_back(stub, streamed.id) == video
        # And the other way round: the second stores, the first reads.
        again = (await stub.UploadMedia(upload(samples.jpeg_bytes(9)), timeout=PATIENCE)).media[0]
        await second.stop()
        stub = await first.start()
        assert await read_back(stub, again.id) == samples.jpeg_bytes(9)
    finally:
        await first.stop()
        await second.stop()


async def test_an_s3_call_ends_within_the_longest_the_sweep_waits_for_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """S3's client times each attempt of a call, not the call: against an endpoint that takes
    the connection and never answers, a delete outlasts the timeout (it tries again) and
    ends within the store's longest call, which the sweep keeps its transaction open for."""
    for name, value in AWS_TEST_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    bucket = S3Bucket(BUCKET, "p", endpoint=f"http://127.0.0.1:{port}", timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(BotoCoreError):
            await asyncio.to_thread(bucket.delete, blob_key("ab" * 32))
        took = time.monotonic() - started
    finally:
        bucket.close()
        silent.close()
    assert 0.5 * 2 < took <= bucket.longest_call


# -- what each client's refusals mean -------------------------------------------------------


def s3_error(code: str, operation: str = "PutObject") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "no"}}, operation)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (s3_error("AccessDenied"), "STORAGE_PERMISSION_DENIED"),
        (s3_error("InvalidAccessKeyId"), "STORAGE_PERMISSION_DENIED"),
        (NoCredentialsError(), "STORAGE_PERMISSION_DENIED"),
        (s3_error("SlowDown"), "STORAGE_QUOTA_EXCEEDED"),
        # A HEAD's refusal has no body: botocore gives its status as the code.
        (s3_error("403", "HeadObject"), "STORAGE_PERMISSION_DENIED"),
        (s3_error("503", "HeadObject"), "STORAGE_QUOTA_EXCEEDED"),
        (s3_error("500", "HeadObject"), "STORAGE_UNAVAILABLE"),
        (s3_error("InternalError"), "STORAGE_UNAVAILABLE"),
        (EndpointConnectionError(endpoint_url="http://s3.example"), "STORAGE_UNAVAILABLE"),
    ],
)
def test_s3_refusals_say_whether_quota_or_permission(error: Exception, reason: str) -> None:
    classified = S3Bucket.classify(error)
    assert classified is not None
    assert classified.reason == reason


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            api_exceptions.Forbidden("no", errors=[{"reason": "forbidden"}]),
            "STORAGE_PERMISSION_DENIED",
        ),
        (api_exceptions.Unauthorized("no"), "STORAGE_PERMISSION_DENIED"),
        (DefaultCredentialsError("none"), "STORAGE_PERMISSION_DENIED"),
        (api_exceptions.TooManyRequests("slow down"), "STORAGE_QUOTA_EXCEEDED"),
        (
            api_exceptions.Forbidden("no", errors=[{"reason": "quotaExceeded"}]),
            "STORAGE_QUOTA_EXCEEDED",
        ),
        (api_exceptions.ServiceUnavailable("down"), "STORAGE_UNAVAILABLE"),
    ],
)
def test_cloud_storage_refusals_say_whether_quota_or_permission(
    error: Exception, reason: str
) -> None:
    classified = GcsBucket.classify(error)
    assert classified is not None
    assert classified.reason == reason


# -- moving a deployment to a bucket -------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("scheme", ["gs", "s3"])
async def test_copy_blobs_moves_a_local_blob_directory_into_a_bucket(
    request: pytest.FixtureRequest, tmp_path: Path, scheme: str
) -> None:
    database = IngestConfig(database_url=sqlite_url(str(tmp_path / "ingest.db")))
    local = IngestServer(tmp_path / "before", config=database)
    image, video = samples.jpeg_bytes(21), samples.mp4_bytes(payload_bytes=7 * MIB)
    try:
        stub = await local.start()
        uploaded = (await stub.UploadMedia(upload(image), timeout=PATIENCE)).media[0]
        streamed = (await upload_stream(stub, video, filename="clip.mp4")).media
    finally:
        await local.stop()
    bucket = store_under_test(request, scheme, tmp_path / "unused")
    command = ["copy-blobs", str(local.blobs.root), "--data-dir", str(tmp_path), *bucket.flags()]

    # A file that cannot be read (here a directory where a blob would be) is left out and
    # said; the others are copied all the same.
    unreadable = local.blobs.root / blob_key("ab" * 32)
    unreadable.mkdir()
    first = await asyncio.to_thread(run_cli, *command)
    assert first.returncode == 1, first.stderr
    assert first.stdout.strip() == (
        "copied 2 blob(s); 0 already there; 1 damaged or unreadable, not copied"
    )
    assert "cannot be read" in first.stderr
    unreadable.rmdir()
    again = await asyncio.to_thread(run_cli, *command)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "copied 0 blob(s); 2 already there"
    assert bucket.blob_keys() == {blob_key(uploaded.sha256), blob_key(streamed.sha256)}

    moved = IngestServer(tmp_path / "after", config=database, store=bucket)
    try:
        stub = await moved.start()
        assert await read_back(stub, uploaded.id) == image
        assert await read_back(stub, streamed.id) == video
    finally:
        await moved.stop()


def test_a_bucket_the_service_cannot_use_is_said_at_start_not_as_a_traceback(
    tmp_path: Path,
) -> None:
    # No credentials anywhere the client looks, and no metadata server to ask.
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")
    }
    environment.update(HOME=str(tmp_path), NO_GCE_CHECK="True")
    store = ["--data-dir", str(tmp_path), "--blob-store", "gs://mediatag-nowhere/blobs"]

    def mediatag(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MEDIATAG, *args], capture_output=True, text=True, env=environment, timeout=PATIENCE
        )

    served = mediatag("serve", "ingest", "--ingest-port", str(free_port()), *store)
    assert served.returncode == 1
    assert "cannot start: no credentials for Cloud Storage" in served.stderr
    assert "Traceback" not in served.stderr
    (tmp_path / "blobs").mkdir()
    copied = mediatag("copy-blobs", str(tmp_path / "blobs"), *store)
    assert copied.returncode == 1
    assert copied.stderr.startswith("nothing copied: no credentials for Cloud Storage")
    endpoint = mediatag(
        "serve", "ingest", "--blob-store", "s3://b/p", "--blob-store-endpoint", "minio:9000"
    )
    assert endpoint.returncode == 2
    assert "--blob-store-endpoint must be an http:// or https:// URL" in endpoint.stderr


def _blob_directory(root: Path, blobs: int, size: int) -> set[str]:
    """A local blob directory of ``blobs`` random blobs of ``size`` bytes; their digests."""
    digests = set()
    for _ in range(blobs):
        content = os.urandom(size)
        digest = sha256_of(content)
        path = root / blob_key(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        digests.add(digest)
    return digests


def _stored(store: Path) -> set[str]:
    """The digests of the blobs in a local store, each checked against its content."""
    stored = set()
    for path in store.glob("??/*"):
        assert sha256_of(path.read_bytes()) == path.name, f"{path} is not whole"
        stored.add(path.name)
    return stored


@pytest.mark.e2e
async def test_ctrl_c_stops_copy_blobs_with_what_it_copied_whole_and_said(
    tmp_path: Path,
) -> None:
    # Enough for the copy to be busy a while after its first blob is seen.
    digests = _blob_directory(tmp_path / "blobs", blobs=5000, size=4096)
    store = tmp_path / "store"
    command = [
        "copy-blobs",
        str(tmp_path / "blobs"),
        "--data-dir",
        str(tmp_path),
        "--blob-store",
        f"file://{store}",
    ]
    copying = await asyncio.create_subprocess_exec(
        MEDIATAG, *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )

    async def copying_blobs() -> bool:
        if copying.returncode is not None:
            _, err = await copying.communicate()
            raise AssertionError(f"the copy ended before it was interrupted: {err.decode()}")
        return any(store.glob("??/*"))

    try:
        await wait_until(copying_blobs)
        copying.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(copying.communicate(), PATIENCE)
    finally:
        if copying.returncode is None:
            copying.kill()
            await copying.wait()

    assert copying.returncode == 130, err
    assert b"Traceback" not in err
    said = re.fullmatch(
        rb"copied (\d+) blob\(s\); 0 already there; interrupted \(run it again to go on\)\n",
        out,
    )
    assert said, out
    stored = _stored(store)
    # A blob stored as the interrupt came may have gone uncounted, none the other way.
    assert int(said[1]) <= len(stored) < len(digests)
    assert list((store / "incoming").iterdir()) == []
    again = await asyncio.to_thread(run_cli, *command)
    assert again.returncode == 0, again.stderr
    assert again.stdout == (
        f"copied {len(digests) - len(stored)} blob(s); {len(stored)} already there\n"
    )
    assert _stored(store) == digests


@pytest.mark.e2e
def test_a_store_failing_midway_stops_copy_blobs_with_its_reason(tmp_path: Path) -> None:
    _blob_directory(tmp_path / "blobs", blobs=3, size=64 * 1024)
    store = tmp_path / "store"
    # A full disk: no file the copy writes may grow beyond 16 KiB. (util-linux's prlimit, as
    # ``Serve`` uses it.)
    copied = subprocess.run(
        [
            "prlimit",
            "--fsize=16384",
            MEDIATAG,
            "copy-blobs",
            str(tmp_path / "blobs"),
            "--data-dir",
            str(tmp_path),
            "--blob-store",
            f"file://{store}",
        ],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )
    assert copied.returncode == 1
    assert "Traceback" not in copied.stderr
    assert copied.stderr.splitlines()[-1].startswith("copy stopped: no room in the blob store")
    assert copied.stderr.endswith("(run it again to go on)\n")
    assert _stored(store) == set()


# -- a crash in the middle of large uploads ------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("scheme", ["gs", "s3"])
async def test_sigkill_amid_large_streams_keeps_every_answered_upload_and_sweeps_the_rest(
    request: pytest.FixtureRequest, tmp_path: Path, scheme: str, seed: int
) -> None:
    chance = random.Random(seed)
    store = store_under_test(request, scheme, tmp_path / "unused")
    port = free_port()
    args = (
        "ingest", "--data-dir", str(tmp_path / "data"), "--ingest-port", str(port),
        "--analysis-address", f"127.0.0.1:{free_port()}", "--max-video-bytes", "32MiB",
        "--blob-sweep-grace", "0.5", "--blob-sweep-temporary-grace", "0.5",
        "--blob-sweep-interval", "0.2", *store.flags(),
    )  # fmt: skip
    ingest = Serve(tmp_path / "ingest.log", *args).start(port)
    answered: list[ipb.Media] = []

    async def paced(content: bytes) -> AsyncIterator[ipb.UploadMediaStreamRequest]:
        yield header(filename="clip.mp4")
        for message in chunks_of(content, 256 * 1024):
            yield message
            await asyncio.sleep(chance.uniform(0, 0.02))

    async def stream_one(number: int) -> None:
        await asyncio.sleep(number * chance.uniform(0.1, 0.4))
        content = samples.mp4_bytes(number, payload_bytes=chance.randrange(6, 14) * MIB)
        with contextlib.suppress(grpc.aio.AioRpcError):
            response = await stub.UploadMediaStream(paced(content), timeout=PATIENCE)
            answered.append(response.media)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        streams = [asyncio.create_task(stream_one(n)) for n in range(8)]

        async def some_answered() -> bool:
            return len(answered) >= 2

        await wait_until(some_answered)
        ingest.kill()
        await asyncio.gather(*streams)
    assert len(answered) < 8, "every stream had ended before the kill: not a crash mid-upload"

    ingest = Serve(tmp_path / "ingest.log", *args).start(port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            for media in answered:
                content = await read_back(stub, media.id)
                assert hashlib.sha256(content).hexdigest() == media.sha256
            # An upload may have committed and been killed before it answered: its row names
            # a blob too.
            named = {blob_key(media.sha256) for media in await all_media(stub)}
            assert {blob_key(media.sha256) for media in answered} <= named

            async def swept() -> bool:
                return store.keys() == named

            await wait_until(swept)
    finally:
        assert ingest.stop() == 0


async def all_media(stub: ingest_pb2_grpc.IngestServiceAsyncStub) -> list[ipb.Media]:
    response = await stub.ListMedia(ipb.ListMediaRequest(owner_id=OWNER, page_size=1000))
    return list(response.media)


async def test_a_process_starting_on_a_shared_directory_leaves_uploads_in_progress_alone(
    tmp_path: Path, blob_store: StoreUnderTest
) -> None:
    """It removes what a crashed process left half-written, not what a running one is
    receiving (on a local blob directory such an upload failed: its spool file was gone)."""
    first = IngestServer(tmp_path / "ingest", store=blob_store)
    second = IngestServer(tmp_path / "ingest", store=blob_store)
    clip = samples.mp4_bytes(payload_bytes=2 * MIB)
    half = len(clip) // 2
    go_on = asyncio.Event()

    async def paused_stream() -> AsyncIterator[ipb.UploadMediaStreamRequest]:
        yield header(filename="in-progress.mp4")
        for message in chunks_of(clip[:half]):
            yield message
        await go_on.wait()
        for message in chunks_of(clip[half:]):
            yield message

    try:
        stub = await first.start()
        receiving = asyncio.ensure_future(stub.UploadMediaStream(paused_stream(), timeout=PATIENCE))

        async def spooling() -> bool:
            return bool(first.incoming_files())

        await wait_until(spooling)
        (in_progress,) = first.incoming_files()
        crashed = first.spool_dir / f"{SPOOL_PREFIX}left-by-a-crash"
        crashed.write_bytes(b"half an upload")

        other = await second.start()

        assert first.incoming_files() == [in_progress]
        go_on.set()
        stored = (await receiving).media
        assert await read_back(stub, stored.id) == clip
        assert await read_back(other, stored.id) == clip
    finally:
        await first.stop()
        await second.stop()
