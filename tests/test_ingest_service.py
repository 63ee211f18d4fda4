"""The ingest service on its own: uploads, reads, refusals, the outbox and the status mirror.

The real ingest server runs in-process on port 0 with a real SQLite file (and, where the
database matters, on PostgreSQL too); where it talks to the analysis service, a test-local
fake of that service's gRPC edge records what it receives.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import timestamp_pb2
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.analysis.v1 import analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2 as ipb

from analysis_service.api.status_codes import STATUS_CODES
from analysis_service.config import AnalysisConfig
from analysis_service.errors import RevisionCompacted, ShuttingDown
from ingest_service.config import IngestConfig
from mediatag_common.errors import DOMAIN, ServiceError, error_info, field_violations
from mediatag_common.grpc_server import new_server
from tests import media_samples as samples
from tests.blob_stores import StoreUnderTest
from tests.conftest import PATIENCE, free_port, wait_until
from tests.ingest_support import IngestServer, database_urls, on_each_database

OWNER = "listing-42"
SEED_MESSAGE = "Uploaded {n} media file(s). {k} image(s) are being analyzed in the background."


def media_file(
    content: bytes, filename: str = "photo.jpg", content_type: str = ""
) -> ipb.MediaFile:
    return ipb.MediaFile(filename=filename, content_type=content_type, content=content)


def upload_request(*files: ipb.MediaFile, owner_id: str = OWNER) -> ipb.UploadMediaRequest:
    return ipb.UploadMediaRequest(owner_id=owner_id, files=files)


async def refusal(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The error a call that must fail ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def assert_refused(
    error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str, field_name: str | None
) -> None:
    assert error.code() == code, error.details()
    info = error_info(error)
    assert info is not None
    assert (info.reason, info.domain) == (reason, DOMAIN)
    if field_name is not None:
        assert [v.field for v in field_violations(error)] == [field_name]


class FakeAnalysis(analysis_pb2_grpc.AnalysisServiceServicer):
    """The analysis service's edge as ingest sees it: records every call it receives.

    Each ``WatchStatus`` call streams what the test sends to it by number (a ServiceError
    ends the stream with that status); ``SubmitJobs`` answers UNAVAILABLE ``submit_failures``
    times first.
    """

    def __init__(self) -> None:
        self.submitted: list[apb.JobSpec] = []
        self.submit_failures = 0
        self.watch_requests: list[apb.WatchStatusRequest] = []
        self._streams: list[asyncio.Queue[apb.WatchStatusResponse | ServiceError]] = []
        self.retry_requests: list[apb.RetryJobsRequest] = []

    def send(self, stream: int, *items: apb.WatchStatusResponse | ServiceError) -> None:
        for item in items:
            self._streams[stream].put_nowait(item)

    async def watch_request(self, stream: int) -> apb.WatchStatusRequest:
        """The request of WatchStatus call number ``stream``, once it has arrived."""

        async def arrived() -> bool:
            return len(self.watch_requests) > stream

        await wait_until(arrived)
        return self.watch_requests[stream]

    async def SubmitJobs(
        self, request: apb.SubmitJobsRequest, context: Any
    ) -> apb.SubmitJobsResponse:
        if self.submit_failures > 0:
            self.submit_failures -= 1
            raise ShuttingDown("starting up", reason="DOWN")
        known = {spec.media_id for spec in self.submitted}
        new = [spec for spec in request.jobs if spec.media_id not in known]
        self.submitted.extend(new)
        return apb.SubmitJobsResponse(
            accepted_count=len(new), existing_count=len(request.jobs) - len(new)
        )

    async def WatchStatus(
        self, request: apb.WatchStatusRequest, context: Any
    ) -> AsyncIterator[apb.WatchStatusResponse]:
        stream: asyncio.Queue[apb.WatchStatusResponse | ServiceError] = asyncio.Queue()
        self._streams.append(stream)
        self.watch_requests.append(request)
        while True:
            item = await stream.get()
            if isinstance(item, ServiceError):
                raise item
            yield item

    async def RetryJobs(self, request: apb.RetryJobsRequest, context: Any) -> apb.RetryJobsResponse:
        self.retry_requests.append(request)
        return apb.RetryJobsResponse(media_ids=request.media_ids, count=len(request.media_ids))


@pytest.fixture
async def analysis_port() -> int:
    """A local port where nothing listens until a test starts the fake there."""
    return free_port()


@pytest.fixture
async def ingest(
    request: pytest.FixtureRequest, tmp_path: Path, analysis_port: int
) -> AsyncIterator[IngestServer]:
    """The ingest service on SQLite, or on each database with ``on_each_database``."""
    urls = database_urls(request, tmp_path / "databases")
    config = IngestConfig(database_url=urls.new("ingest"))
    runner = IngestServer(tmp_path / "ingest", config=config, analysis_port=analysis_port)
    yield runner
    await runner.stop()
    urls.drop()


@pytest.fixture
async def ingest_on_each_store(
    tmp_path: Path, analysis_port: int, blob_store: StoreUnderTest
) -> AsyncIterator[IngestServer]:
    """The ingest service with its blobs in each store in turn."""
    runner = IngestServer(tmp_path / "ingest", analysis_port=analysis_port, store=blob_store)
    yield runner
    await runner.stop()


@pytest.fixture
async def start_fake(
    analysis_port: int,
) -> AsyncIterator[Callable[[], Awaitable[FakeAnalysis]]]:
    servers: list[grpc.aio.Server] = []

    async def start() -> FakeAnalysis:
        # Only the methods ingest calls are implemented.
        fake = FakeAnalysis()  # type: ignore[abstract]
        config = AnalysisConfig()
        server = new_server(config.request_limits, config.server_limits, status_codes=STATUS_CODES)
        analysis_pb2_grpc.add_AnalysisServiceServicer_to_server(fake, server)
        server.add_insecure_port(f"127.0.0.1:{analysis_port}")
        await server.start()
        servers.append(server)
        return fake

    yield start
    for server in servers:
        await server.stop(0)


# -- uploads ---------------------------------------------------------------------------------


async def test_upload_answers_at_once_with_types_sniffed_from_the_bytes(
    ingest: IngestServer,
) -> None:
    stub = await ingest.start()
    contents = [
        (samples.jpeg_bytes(1), "image/jpeg", (320, 240)),
        (samples.png_bytes(2, (200, 100)), "image/png", (200, 100)),
        (samples.webp_bytes(3), "image/webp", (320, 240)),
        (samples.bmp_bytes(4), "image/bmp", (320, 240)),
        (samples.tiff_bytes(5), "image/tiff", (320, 240)),
        (samples.mp4_bytes(), "video/mp4", (0, 0)),
    ]
    # Names and declared types lie; the bytes decide.
    files = [
        media_file(c, filename=f"file{i}.txt", content_type="text/plain")
        for i, (c, _, _) in enumerate(contents)
    ]
    request = ipb.UploadMediaRequest(
        owner_id=OWNER, category="Hair", context={"style": "fade"}, priority=3, files=files
    )

    # Nothing listens at the analysis address: the answer does not wait for it.
    response = await stub.UploadMedia(request, timeout=PATIENCE)

    assert response.message == SEED_MESSAGE.format(n=6, k=5)
    assert response.count == 6
    for media, (content, content_type, (width, height)), sent in zip(
        response.media, contents, files, strict=True
    ):
        is_video = content_type.startswith("video/")
        assert media.content_type == content_type
        assert media.kind == (ipb.MEDIA_KIND_VIDEO if is_video else ipb.MEDIA_KIND_IMAGE)
        assert media.status == (
            ipb.PROCESSING_STATUS_NOT_APPLICABLE if is_video else ipb.PROCESSING_STATUS_PENDING
        )
        assert media.not_applicable_reason == ("video" if is_video else "")
        assert (media.width, media.height) == (width, height)
        assert media.size_bytes == len(content)
        assert media.sha256 == hashlib.sha256(content).hexdigest()
        assert media.filename == sent.filename
        assert (media.owner_id, media.category, dict(media.context), media.priority) == (
            OWNER,
            "Hair",
            {"style": "fade"},
            3,
        )
        stored = await stub.GetMedia(ipb.GetMediaRequest(media_id=media.id), timeout=PATIENCE)
        assert stored.media == media
    assert len({m.id for m in response.media}) == 6


@pytest.mark.parametrize(
    ("content", "content_type", "kind", "reason"),
    [
        (samples.gif_bytes(1), "image/gif", ipb.MEDIA_KIND_IMAGE, ""),
        (samples.animated_gif_bytes(2), "image/gif", ipb.MEDIA_KIND_IMAGE, "animated"),
        (samples.animated_webp_bytes(3), "image/webp", ipb.MEDIA_KIND_IMAGE, "animated"),
        (samples.quicktime_bytes(), "video/quicktime", ipb.MEDIA_KIND_VIDEO, "video"),
        (samples.webm_bytes(), "video/webm", ipb.MEDIA_KIND_VIDEO, "video"),
        (samples.matroska_bytes(), "video/x-matroska", ipb.MEDIA_KIND_VIDEO, "video"),
        (samples.avi_bytes(), "video/x-msvideo", ipb.MEDIA_KIND_VIDEO, "video"),
    ],
    ids=["still-gif", "animated-gif", "animated-webp", "quicktime", "webm", "matroska", "avi"],
)
async def test_animated_images_and_videos_are_stored_but_not_analysed(
    ingest: IngestServer, content: bytes, content_type: str, kind: int, reason: str
) -> None:
    stub = await ingest.start()

    response = await stub.UploadMedia(
        upload_request(media_file(content, "x.jpg")), timeout=PATIENCE
    )

    (media,) = response.media
    assert (media.content_type, media.kind, media.not_applicable_reason) == (
        content_type,
        kind,
        reason,
    )
    expected_status = (
        ipb.PROCESSING_STATUS_NOT_APPLICABLE if reason else ipb.PROCESSING_STATUS_PENDING
    )
    assert media.status == expected_status
    assert response.message == SEED_MESSAGE.format(n=1, k=0 if reason else 1)


async def test_identical_content_is_stored_once(ingest_on_each_store: IngestServer) -> None:
    ingest = ingest_on_each_store
    stub = await ingest.start()
    content = samples.jpeg_bytes(7)

    first = await stub.UploadMedia(
        upload_request(media_file(content, "a.jpg"), media_file(content, "b.jpg")), timeout=PATIENCE
    )
    second = await stub.UploadMedia(upload_request(media_file(content, "c.jpg")), timeout=PATIENCE)

    digest = hashlib.sha256(content).hexdigest()
    media = [*first.media, *second.media]
    assert [m.sha256 for m in media] == [digest] * 3
    assert len({m.id for m in media}) == 3
    assert ingest.blob_files() == {ingest.blob(digest)}
    assert ingest.blobs.read(digest) == content


# -- refusals --------------------------------------------------------------------------------


def _batch_with(bad: ipb.MediaFile) -> ipb.UploadMediaRequest:
    good = [media_file(samples.jpeg_bytes(100 + n), f"good{n}.jpg") for n in range(2)]
    return upload_request(good[0], good[1], bad)


REFUSED_BATCHES: dict[str, tuple[Callable[[], ipb.UploadMediaRequest], str, str]] = {
    "empty-file": (
        lambda: _batch_with(media_file(b"", "empty.jpg")),
        "EMPTY_FILE",
        "files[2].content",
    ),
    "not-an-image-named-jpeg": (
        lambda: _batch_with(media_file(b"just some text " * 64, "photo.jpg", "image/jpeg")),
        "UNSUPPORTED_MEDIA_TYPE",
        "files[2].content",
    ),
    "truncated-jpeg": (
        lambda: _batch_with(media_file(samples.truncated_jpeg_bytes(5), "cut.jpg")),
        "CORRUPT_IMAGE",
        "files[2].content",
    ),
    "decompression-bomb": (
        lambda: _batch_with(media_file(samples.decompression_bomb_png_bytes(), "bomb.png")),
        "IMAGE_TOO_LARGE",
        "files[2].content",
    ),
    "image-over-size-limit": (
        lambda: _batch_with(media_file(b"\xff\xd8\xff" + bytes(20 * 1024 * 1024), "big.jpg")),
        "FILE_TOO_LARGE",
        "files[2].content",
    ),
    "filename-too-long": (
        lambda: _batch_with(media_file(samples.jpeg_bytes(9), "x" * 300 + ".jpg")),
        "INVALID_FILENAME",
        "files[2].filename",
    ),
    "too-many-files": (
        lambda: upload_request(*[media_file(samples.gif_bytes(n, (8, 8))) for n in range(33)]),
        "TOO_MANY_FILES",
        "files",
    ),
    "no-files": (lambda: upload_request(), "NO_FILES", "files"),
    "bad-owner": (
        lambda: upload_request(media_file(samples.jpeg_bytes(1)), owner_id="../etc/passwd"),
        "INVALID_OWNER_ID",
        "owner_id",
    ),
    "no-owner": (
        lambda: upload_request(media_file(samples.jpeg_bytes(1)), owner_id=""),
        "OWNER_ID_REQUIRED",
        "owner_id",
    ),
    "category-too-long": (
        lambda: ipb.UploadMediaRequest(
            owner_id=OWNER, category="c" * 200, files=[media_file(samples.jpeg_bytes(1))]
        ),
        "INVALID_CATEGORY",
        "category",
    ),
    "context-value-too-long": (
        lambda: ipb.UploadMediaRequest(
            owner_id=OWNER, context={"note": "v" * 2000}, files=[media_file(samples.jpeg_bytes(1))]
        ),
        "INVALID_CONTEXT",
        "context",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_BATCHES))
async def test_a_bad_item_rejects_the_whole_batch_and_stores_nothing(
    ingest: IngestServer, case: str
) -> None:
    make_request, reason, field_name = REFUSED_BATCHES[case]
    stub = await ingest.start()
    await stub.UploadMedia(upload_request(media_file(samples.jpeg_bytes(1))), timeout=PATIENCE)
    listed_before = await stub.ListMedia(ipb.ListMediaRequest(owner_id=OWNER), timeout=PATIENCE)
    blobs_before = ingest.blob_files()

    error = await refusal(stub.UploadMedia(make_request(), timeout=PATIENCE))

    assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, reason, field_name)
    listed_after = await stub.ListMedia(ipb.ListMediaRequest(owner_id=OWNER), timeout=PATIENCE)
    assert listed_after == listed_before
    assert ingest.blob_files() == blobs_before


# -- reads -----------------------------------------------------------------------------------


@on_each_database("ingest")
async def test_list_media_pages_newest_first_and_filters_by_status(
    ingest: IngestServer,
) -> None:
    stub = await ingest.start()
    uploaded: list[str] = []
    for n in range(4):
        response = await stub.UploadMedia(
            upload_request(media_file(samples.jpeg_bytes(n))), timeout=PATIENCE
        )
        uploaded.append(response.media[0].id)
    video = await stub.UploadMedia(
        upload_request(media_file(samples.mp4_bytes())), timeout=PATIENCE
    )
    uploaded.append(video.media[0].id)
    elsewhere = await stub.UploadMedia(
        upload_request(media_file(samples.jpeg_bytes(9)), owner_id="someone-else"), timeout=PATIENCE
    )

    pages: list[list[str]] = []
    token = ""
    while True:
        page = await stub.ListMedia(
            ipb.ListMediaRequest(owner_id=OWNER, page_size=2, page_token=token), timeout=PATIENCE
        )
        pages.append([m.id for m in page.media])
        token = page.next_page_token
        if not token:
            break

    assert pages == [uploaded[::-1][i : i + 2] for i in (0, 2, 4)]
    pending = await stub.ListMedia(
        ipb.ListMediaRequest(owner_id=OWNER, status=ipb.PROCESSING_STATUS_PENDING), timeout=PATIENCE
    )
    assert [m.id for m in pending.media] == uploaded[3::-1]
    not_applicable = await stub.ListMedia(
        ipb.ListMediaRequest(owner_id=OWNER, status=ipb.PROCESSING_STATUS_NOT_APPLICABLE),
        timeout=PATIENCE,
    )
    assert [m.id for m in not_applicable.media] == [uploaded[4]]
    # No owner: every owner's items (the caller may see every owner: no tokens here).
    everyone: list[str] = []
    token = ""
    while True:
        page = await stub.ListMedia(
            ipb.ListMediaRequest(
                status=ipb.PROCESSING_STATUS_PENDING, page_size=3, page_token=token
            ),
            timeout=PATIENCE,
        )
        everyone.extend(m.id for m in page.media)
        if not (token := page.next_page_token):
            break
    assert everyone == [elsewhere.media[0].id, *uploaded[3::-1]]


async def test_list_media_refuses_bad_paging(ingest: IngestServer) -> None:
    stub = await ingest.start()
    for n in range(3):
        await stub.UploadMedia(upload_request(media_file(samples.jpeg_bytes(n))), timeout=PATIENCE)
    first = await stub.ListMedia(
        ipb.ListMediaRequest(owner_id=OWNER, page_size=1), timeout=PATIENCE
    )
    assert first.next_page_token

    other_filter = ipb.ListMediaRequest(
        owner_id=OWNER,
        status=ipb.PROCESSING_STATUS_PENDING,
        page_size=1,
        page_token=first.next_page_token,
    )
    cases = [
        (other_filter, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token"),
        (
            ipb.ListMediaRequest(owner_id=OWNER, page_token="not a token!"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
            "page_token",
        ),
        (
            ipb.ListMediaRequest(owner_id=OWNER, page_size=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_SIZE",
            "page_size",
        ),
        (
            ipb.ListMediaRequest(owner_id="no spaces"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_OWNER_ID",
            "owner_id",
        ),
    ]
    for request, code, reason, field_name in cases:
        error = await refusal(stub.ListMedia(request, timeout=PATIENCE))
        assert_refused(error, code, reason, field_name)


async def test_get_media_of_an_unknown_id_is_not_found(ingest: IngestServer) -> None:
    stub = await ingest.start()

    unknown = await refusal(
        stub.GetMedia(ipb.GetMediaRequest(media_id="no-such-id"), timeout=PATIENCE)
    )
    missing = await refusal(stub.GetMedia(ipb.GetMediaRequest(), timeout=PATIENCE))

    assert_refused(unknown, grpc.StatusCode.NOT_FOUND, "MEDIA_NOT_FOUND", "media_id")
    assert_refused(missing, grpc.StatusCode.INVALID_ARGUMENT, "MEDIA_ID_REQUIRED", "media_id")


async def test_read_media_content_streams_exactly_the_uploaded_bytes(
    ingest_on_each_store: IngestServer,
) -> None:
    ingest = ingest_on_each_store
    stub = await ingest.start()
    content = samples.jpeg_bytes(11, (1600, 1200), quality=95)
    assert len(content) > 2 * 256 * 1024
    uploaded = await stub.UploadMedia(upload_request(media_file(content)), timeout=PATIENCE)
    media_id = uploaded.media[0].id

    chunks = [
        chunk
        async for chunk in stub.ReadMediaContent(
            ipb.ReadMediaContentRequest(media_id=media_id), timeout=PATIENCE
        )
    ]

    assert b"".join(c.data for c in chunks) == content
    assert len(chunks) == -(-len(content) // (256 * 1024))
    assert (chunks[0].content_type, chunks[0].size_bytes, chunks[0].sha256) == (
        "image/jpeg",
        len(content),
        hashlib.sha256(content).hexdigest(),
    )
    assert all(not c.sha256 and not c.content_type for c in chunks[1:])
    error = await refusal(
        anext(aiter(stub.ReadMediaContent(ipb.ReadMediaContentRequest(media_id="nope"))))
    )
    assert_refused(error, grpc.StatusCode.NOT_FOUND, "MEDIA_NOT_FOUND", "media_id")


# -- the outbox ------------------------------------------------------------------------------


@on_each_database("ingest")
async def test_outbox_keeps_jobs_while_analysis_is_down_and_delivers_each_once(
    ingest: IngestServer, start_fake: Callable[[], Awaitable[FakeAnalysis]]
) -> None:
    stub = await ingest.start()
    images = [samples.jpeg_bytes(20 + n) for n in range(3)]
    request = ipb.UploadMediaRequest(
        owner_id=OWNER,
        category="Hair",
        context={"style": "fade"},
        priority=7,
        files=[*(media_file(c) for c in images), media_file(samples.mp4_bytes(), "clip.mp4")],
    )
    uploaded = await stub.UploadMedia(request, timeout=PATIENCE)
    await ingest.stop()

    fake = await start_fake()
    fake.submit_failures = 1
    stub = await ingest.start()
    expected = {m.id: m for m in uploaded.media[:3]}

    async def delivered() -> bool:
        return len(fake.submitted) >= 3

    await wait_until(delivered)
    # A later upload is delivered after the earlier rows (id order), so any repeat of them
    # would have been recorded by now.
    later = await stub.UploadMedia(
        upload_request(media_file(samples.png_bytes(30))), timeout=PATIENCE
    )
    later_id = later.media[0].id

    async def later_delivered() -> bool:
        return any(spec.media_id == later_id for spec in fake.submitted)

    await wait_until(later_delivered)

    counts = Counter(spec.media_id for spec in fake.submitted)
    assert counts == Counter([*expected, later_id])
    for spec in fake.submitted[:3]:
        media = expected[spec.media_id]
        assert spec == apb.JobSpec(
            media_id=media.id,
            owner_id=OWNER,
            category="Hair",
            context={"style": "fade"},
            sha256=media.sha256,
            size_bytes=media.size_bytes,
            content_type="image/jpeg",
            content_ref=media.id,
            priority=7,
        )


# -- the status mirror -----------------------------------------------------------------------


def change(
    revision: int,
    media_id: str,
    status: apb.ProcessingStatus,
    *,
    attempt: int = 1,
    initial_state: bool = False,
    result: apb.AnalysisResult | None = None,
    error: apb.JobError | None = None,
) -> apb.WatchStatusResponse:
    event_time = timestamp_pb2.Timestamp()
    event_time.GetCurrentTime()
    return apb.WatchStatusResponse(
        revision=revision,
        change=apb.StatusChange(
            media_id=media_id,
            owner_id=OWNER,
            status=status,
            attempt=attempt,
            initial_state=initial_state,
            result=result,
            error=error,
            event_time=event_time,
        ),
    )


def bookmark(revision: int, *, initial_state_end: bool = False) -> apb.WatchStatusResponse:
    return apb.WatchStatusResponse(
        revision=revision, bookmark=apb.Bookmark(initial_state_end=initial_state_end)
    )


@on_each_database("ingest")
async def test_status_mirror_applies_changes_and_resumes_from_the_last_revision(
    ingest: IngestServer, start_fake: Callable[[], Awaitable[FakeAnalysis]]
) -> None:
    fake = await start_fake()
    stub = await ingest.start()
    uploaded = await stub.UploadMedia(
        upload_request(media_file(samples.jpeg_bytes(1)), media_file(samples.jpeg_bytes(2))),
        timeout=PATIENCE,
    )
    done_id, failed_id = (m.id for m in uploaded.media)
    embedding = np.linspace(-1, 1, 16, dtype=np.float32)

    first = await fake.watch_request(0)
    assert (first.send_initial_state, first.start_revision, first.include_embedding) == (
        True,
        0,
        True,
    )
    fake.send(
        0,
        change(1, done_id, apb.PROCESSING_STATUS_PENDING, attempt=0, initial_state=True),
        change(2, failed_id, apb.PROCESSING_STATUS_PENDING, attempt=0, initial_state=True),
        bookmark(2, initial_state_end=True),
        change(3, done_id, apb.PROCESSING_STATUS_PROCESSING),
        change(
            4,
            done_id,
            apb.PROCESSING_STATUS_COMPLETED,
            result=apb.AnalysisResult(
                tags=["mens-fade-haircut", "warm-colours"],
                embedding=embedding.tolist(),
                embedding_dimensions=16,
                analyzer_name="local",
                analyzer_version="1.0",
                reused=True,
            ),
        ),
        change(5, "unknown-media", apb.PROCESSING_STATUS_COMPLETED),
        change(
            6,
            failed_id,
            apb.PROCESSING_STATUS_FAILED,
            attempt=3,
            error=apb.JobError(reason="MAX_ATTEMPTS_EXCEEDED", message="gave up", transient=True),
        ),
        bookmark(9),
        ShuttingDown("restarting"),
    )

    # The stream ended after the bookmark: the mirror resumes from the persisted revision.
    second = await fake.watch_request(1)
    assert (second.send_initial_state, second.start_revision, second.include_embedding) == (
        False,
        9,
        True,
    )
    done = (
        await stub.GetMedia(
            ipb.GetMediaRequest(media_id=done_id, view=ipb.MEDIA_VIEW_FULL), timeout=PATIENCE
        )
    ).media
    assert done.status == ipb.PROCESSING_STATUS_COMPLETED
    assert list(done.tags) == ["mens-fade-haircut", "warm-colours"]
    assert np.array_equal(np.array(done.embedding, dtype=np.float32), embedding)
    assert (done.embedding_dimensions, done.analyzer_name, done.analyzer_version) == (
        16,
        "local",
        "1.0",
    )
    assert (done.reused, done.attempt, done.status_revision) == (True, 1, 4)
    basic = (await stub.GetMedia(ipb.GetMediaRequest(media_id=done_id), timeout=PATIENCE)).media
    assert not basic.embedding
    assert (list(basic.tags), basic.embedding_dimensions) == (list(done.tags), 16)
    failed = (await stub.GetMedia(ipb.GetMediaRequest(media_id=failed_id), timeout=PATIENCE)).media
    assert failed.status == ipb.PROCESSING_STATUS_FAILED
    assert (failed.error.reason, failed.error.message, failed.error.attempt) == (
        "MAX_ATTEMPTS_EXCEEDED",
        "gave up",
        3,
    )
    assert (list(failed.tags), failed.status_revision) == ([], 6)
    for view, has_embedding in [(ipb.MEDIA_VIEW_BASIC, False), (ipb.MEDIA_VIEW_FULL, True)]:
        listed = await stub.ListMedia(
            ipb.ListMediaRequest(owner_id=OWNER, status=ipb.PROCESSING_STATUS_COMPLETED, view=view),
            timeout=PATIENCE,
        )
        assert [m.id for m in listed.media] == [done_id]
        assert bool(listed.media[0].embedding) is has_embedding

    # A restart of ingest resumes from the same revision.
    await ingest.stop()
    stub = await ingest.start()
    third = await fake.watch_request(2)
    assert (third.send_initial_state, third.start_revision) == (False, 9)

    # When that revision has been compacted away, the mirror re-syncs from the current state;
    # an initial-state change no newer than what a row holds leaves the row as it is.
    fake.send(
        2,
        RevisionCompacted("compacted"),
    )
    fourth = await fake.watch_request(3)
    assert (fourth.send_initial_state, fourth.start_revision, fourth.include_embedding) == (
        True,
        0,
        True,
    )
    fake.send(
        3,
        change(6, failed_id, apb.PROCESSING_STATUS_PENDING, initial_state=True),
        change(40, done_id, apb.PROCESSING_STATUS_PENDING, initial_state=True),
        bookmark(41, initial_state_end=True),
    )

    async def reprocessed() -> bool:
        media = (await stub.GetMedia(ipb.GetMediaRequest(media_id=done_id), timeout=PATIENCE)).media
        return media.status == ipb.PROCESSING_STATUS_PENDING

    await wait_until(reprocessed)
    reset = (await stub.GetMedia(ipb.GetMediaRequest(media_id=done_id), timeout=PATIENCE)).media
    assert (list(reset.tags), reset.status_revision) == ([], 40)
    still_failed = (
        await stub.GetMedia(ipb.GetMediaRequest(media_id=failed_id), timeout=PATIENCE)
    ).media
    assert (still_failed.status, still_failed.status_revision) == (
        ipb.PROCESSING_STATUS_FAILED,
        6,
    )


# -- reprocessing ----------------------------------------------------------------------------


@on_each_database("ingest")
async def test_reprocess_passes_on_to_analysis(
    ingest: IngestServer, start_fake: Callable[[], Awaitable[FakeAnalysis]]
) -> None:
    fake = await start_fake()
    stub = await ingest.start()
    uploaded = await stub.UploadMedia(
        upload_request(media_file(samples.jpeg_bytes(1)), media_file(samples.mp4_bytes())),
        timeout=PATIENCE,
    )
    image_id, video_id = (m.id for m in uploaded.media)

    async def delivered() -> bool:
        return len(fake.submitted) == 1

    await wait_until(delivered)

    by_ids = await stub.ReprocessMedia(
        ipb.ReprocessMediaRequest(media_ids=[image_id, video_id]), timeout=PATIENCE
    )
    by_owner = await stub.ReprocessMedia(
        ipb.ReprocessMediaRequest(owner_id=OWNER, status=ipb.PROCESSING_STATUS_COMPLETED),
        timeout=PATIENCE,
    )
    unknown = await refusal(
        stub.ReprocessMedia(
            ipb.ReprocessMediaRequest(media_ids=[image_id, "nope"]), timeout=PATIENCE
        )
    )

    # The video was never analysed: there is nothing to redo.
    assert (list(by_ids.media_ids), by_ids.count) == ([image_id], 1)
    assert by_owner.count == 0
    assert fake.retry_requests == [
        apb.RetryJobsRequest(media_ids=[image_id]),
        apb.RetryJobsRequest(owner_id=OWNER, status=apb.PROCESSING_STATUS_COMPLETED),
    ]
    assert_refused(unknown, grpc.StatusCode.NOT_FOUND, "MEDIA_NOT_FOUND", "media_ids[1]")


async def test_reprocess_while_analysis_is_down_is_unavailable(ingest: IngestServer) -> None:
    stub = await ingest.start()
    await stub.UploadMedia(upload_request(media_file(samples.jpeg_bytes(1))), timeout=PATIENCE)

    error = await refusal(
        stub.ReprocessMedia(ipb.ReprocessMediaRequest(owner_id=OWNER), timeout=PATIENCE)
    )

    assert_refused(error, grpc.StatusCode.UNAVAILABLE, "ANALYSIS_UNAVAILABLE", None)
