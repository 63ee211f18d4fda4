"""Property-based tests of upload input handling against a real in-process ingest server.

Hypothesis throws arbitrary bytes, names, declared types, metadata and request ids at
UploadMedia and UploadMediaStream. Every answer must be a success that stored exactly the
bytes sent, or a refusal the README documents (its code, an ErrorInfo reason from the
README's refusal table, domain ``mediatag``, and for INVALID_ARGUMENT a field of the
request) that stored nothing; never UNKNOWN or INTERNAL. Afterwards the service is still
SERVING, a normal upload works, and every item accepted along the way reads back intact.

One server serves all the examples of a test (that is the point: what one example did must
not break the next), so the tests drive their own event loop instead of pytest-asyncio's.
``MEDIATAG_FUZZ_EXAMPLES`` raises the number of examples for a longer local run.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from ingest_service.config import IngestConfig
from mediatag_common.errors import DOMAIN, error_info, field_violations
from tests import media_samples as samples
from tests.conftest import PATIENCE
from tests.ingest_support import IngestServer, stream_with_sync_client

EXAMPLES = int(os.environ.get("MEDIATAG_FUZZ_EXAMPLES", "150"))
settings.register_profile(
    "mediatag-upload-fuzz",
    max_examples=EXAMPLES,
    # Each example is a real call; timing varies with the machine's load.
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
FUZZ = settings.get_profile("mediatag-upload-fuzz")
README = Path(__file__).resolve().parent.parent / "README.md"
FUZZ_OWNER = "fuzz-owner"
T = TypeVar("T")


def documented_refusals() -> dict[str, str]:
    """Reason -> status code name, from the README's table of the ingest service's refusals."""
    text = README.read_text()
    section = text[text.index("### Refusals") :]
    section = section[: section.index("\n### ", 1)]
    found: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        code = cells[0].strip("`")
        for reason in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[1]):
            found[reason] = code
    return found


DOCUMENTED = documented_refusals()
UNARY_FIELDS = re.compile(
    r"owner_id|category|context|files|request_id|files\[(?P<index>\d+)\]\.(content|filename)"
)
STREAM_FIELDS = re.compile(r"header|header\.[a-z_0-9]+|chunk")

# -- strategies ------------------------------------------------------------------------------

VALID_MEDIA = [
    samples.jpeg_bytes(81, (64, 48)),
    samples.png_bytes(82, (40, 30)),
    samples.gif_bytes(83, (32, 32)),
    samples.animated_gif_bytes(84, (24, 24), frames=2),
    samples.webp_bytes(85, (48, 32)),
    samples.bmp_bytes(86, (16, 16)),
    samples.tiff_bytes(87, (16, 16)),
    samples.mp4_bytes(88, payload_bytes=256),
    samples.webm_bytes(89, payload_bytes=128),
    samples.avi_bytes(90, payload_bytes=128),
]
BROKEN_MEDIA = [
    samples.truncated_jpeg_bytes(91, (64, 48)),
    samples.decompression_bomb_png_bytes(),
    samples.mp4_bytes(brand=b"heic"),
]
SIGNATURES = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP", b"BM"]
SIGNATURES += [
    b"II*\x00",
    b"\x00\x00\x00\x18ftypisom",
    b"\x1a\x45\xdf\xa3",
    b"RIFF\x10\x00\x00\x00AVI ",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid file cut short, with bytes flipped, or with junk appended."""
    original = bytearray(draw(st.sampled_from(VALID_MEDIA)))
    how = draw(st.sampled_from(["cut", "flip", "append"]))
    if how == "cut":
        return bytes(original[: draw(st.integers(0, len(original) - 1))])
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(original) - 1))
            original[position] ^= draw(st.integers(1, 255))
        return bytes(original)
    return bytes(original) + draw(st.binary(min_size=1, max_size=512))


contents = st.one_of(
    st.sampled_from(VALID_MEDIA),
    st.one_of(
        st.binary(max_size=1024),
        st.sampled_from(BROKEN_MEDIA),
        mutated(),
        st.builds(
            lambda head, tail: head + tail, st.sampled_from(SIGNATURES), st.binary(max_size=256)
        ),
    ),
)
VALID_SHA256S = [hashlib.sha256(content).hexdigest() for content in VALID_MEDIA]
REQUEST_ID_POOL = [str(uuid.UUID(int=n + 1)) for n in range(4)]
request_ids = st.one_of(
    st.just(""),
    st.sampled_from(REQUEST_ID_POOL),
    st.uuids().map(str),
    st.text(max_size=40),
)


def mostly(valid: st.SearchStrategy[T], anything: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``valid`` nine times in ten, else ``anything``: most examples get as far as the bytes."""
    # Hypothesis favours the ends of a range, so "anything" sits in the middle of it.
    return st.sampled_from(range(10)).flatmap(lambda n: anything if n == 4 else valid)


printable = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=60)
owner_ids = mostly(
    st.one_of(st.just(FUZZ_OWNER), st.from_regex(r"[A-Za-z0-9._:@-]{1,128}", fullmatch=True)),
    st.text(max_size=140),
)
texts = mostly(st.one_of(st.just(""), printable), st.text(max_size=140))
contexts = mostly(
    st.dictionaries(printable.filter(bool), printable, max_size=4),
    st.dictionaries(st.text(max_size=140), st.text(max_size=1100), max_size=34),
)
content_types = st.one_of(
    st.just(""), st.sampled_from(["image/jpeg", "video/mp4", "text/plain"]), st.text(max_size=40)
)
filenames = mostly(
    st.one_of(
        st.sampled_from(["photo.jpg", "../../etc/passwd", "a/b\\c.png", "clip.mp4", ""]),
        printable,
    ),
    st.text(max_size=270),
)
media_files = st.builds(
    ipb.MediaFile, filename=filenames, content_type=content_types, content=contents
)
priorities = st.integers(-(2**31), 2**31 - 1)


@st.composite
def upload_requests(draw: st.DrawFn) -> ipb.UploadMediaRequest:
    files = draw(
        mostly(
            st.lists(media_files, min_size=1, max_size=4),
            st.one_of(st.just([]), st.lists(media_files, min_size=33, max_size=34)),
        )
    )
    return ipb.UploadMediaRequest(
        owner_id=draw(owner_ids),
        category=draw(texts),
        context=draw(contexts),
        request_id=draw(request_ids),
        priority=draw(priorities),
        files=files,
    )


@dataclass
class StreamCase:
    messages: list[ipb.UploadMediaStreamRequest]
    content: bytes


@st.composite
def stream_cases(draw: st.DrawFn) -> StreamCase:
    content = draw(contents)
    sha256 = hashlib.sha256(content).hexdigest()
    header = ipb.UploadHeader(
        owner_id=draw(owner_ids),
        category=draw(texts),
        context=draw(contexts),
        filename=draw(filenames),
        content_type=draw(content_types),
        request_id=draw(request_ids),
        priority=draw(priorities),
        size_bytes=draw(
            mostly(
                st.sampled_from([0, len(content)]),
                st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(0, 4096)),
            )
        ),
        sha256=draw(
            mostly(
                st.sampled_from(["", sha256, sha256.upper()]),
                st.one_of(st.text(max_size=70), st.sampled_from(VALID_SHA256S)),
            )
        ),
    )
    cuts = sorted(draw(st.lists(st.integers(0, len(content)), max_size=6)))
    pieces = [content[a:b] for a, b in zip([0, *cuts], [*cuts, len(content)], strict=True)]
    messages = [ipb.UploadMediaStreamRequest(chunk=piece) for piece in pieces]
    where = draw(mostly(st.just("first"), st.sampled_from(["missing", "twice", "late"])))
    if where in ("first", "twice"):
        messages.insert(0, ipb.UploadMediaStreamRequest(header=header))
    if where == "twice":
        messages.insert(
            draw(st.integers(1, len(messages))), ipb.UploadMediaStreamRequest(header=header)
        )
    if where == "late":
        messages.insert(
            draw(st.integers(1, len(messages))), ipb.UploadMediaStreamRequest(header=header)
        )
    return StreamCase(messages, content)


# -- the harness -----------------------------------------------------------------------------


@dataclass
class Harness:
    """One ingest server, what it accepted (media id -> sha256), and the checks."""

    server: IngestServer
    stub: ingest_pb2_grpc.IngestServiceAsyncStub | None = None
    accepted: dict[str, str] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)

    async def start(self) -> None:
        self.stub = await self.server.start()

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def check_refusal(self, error: grpc.RpcError, fields: re.Pattern[str], files: int) -> None:
        code = error.code()
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), error.details()
        info = error_info(error)
        assert info is not None, (code, error.details())
        assert info.domain == DOMAIN
        assert info.reason in DOCUMENTED, f"undocumented reason {info.reason}"
        assert code.name == DOCUMENTED[info.reason], (code, info.reason)
        violations = field_violations(error)
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            assert violations, info.reason
        for violation in violations:
            match = fields.fullmatch(violation.field)
            assert match is not None, violation.field
            index = match.groupdict().get("index")
            if index is not None:
                assert int(index) < files
        self._count(info.reason)

    async def upload(self, request: ipb.UploadMediaRequest) -> None:
        assert self.stub is not None
        blobs = self.server.blob_files()
        try:
            response = await self.stub.UploadMedia(request, timeout=PATIENCE)
        except grpc.aio.AioRpcError as error:
            self.check_refusal(error, UNARY_FIELDS, len(request.files))
            assert self.server.blob_files() == blobs
            return
        assert response.count == len(response.media) == len(request.files)
        for media, sent in zip(response.media, request.files, strict=True):
            self.record(media, sent.content, request.owner_id)
        self._count("OK")

    async def upload_stream(self, case: StreamCase) -> None:
        assert self.stub is not None
        blobs = self.server.blob_files()

        try:
            # Refusals can come before the last message is sent: see stream_with_sync_client.
            response = await stream_with_sync_client(self.server, case.messages)
        except grpc.RpcError as error:
            self.check_refusal(error, STREAM_FIELDS, 0)
            assert self.server.blob_files() == blobs
            assert self.server.incoming_files() == []
            return
        owner = next(m.header.owner_id for m in case.messages if m.HasField("header"))
        self.record(response.media, case.content, owner)
        assert self.server.incoming_files() == []
        self._count("OK")

    def record(self, media: ipb.Media, content: bytes, owner_id: str) -> None:
        sha256 = hashlib.sha256(content).hexdigest()
        assert (media.sha256, media.size_bytes, media.owner_id) == (sha256, len(content), owner_id)
        assert media.status in (
            ipb.PROCESSING_STATUS_PENDING,
            ipb.PROCESSING_STATUS_NOT_APPLICABLE,
        )
        assert self.accepted.setdefault(media.id, sha256) == sha256
        assert self.server.blob(sha256) in self.server.blob_files()

    async def still_healthy_and_intact(self) -> None:
        """SERVING, a normal upload works, and every accepted item reads back unchanged."""
        assert self.stub is not None
        assert await self.server.health() == health_pb2.HealthCheckResponse.SERVING
        normal = samples.jpeg_bytes(99)
        response = await self.stub.UploadMedia(
            ipb.UploadMediaRequest(owner_id=FUZZ_OWNER, files=[ipb.MediaFile(content=normal)]),
            timeout=PATIENCE,
        )
        self.record(response.media[0], normal, FUZZ_OWNER)
        for media_id, sha256 in self.accepted.items():
            digest = hashlib.sha256()
            async for chunk in self.stub.ReadMediaContent(
                ipb.ReadMediaContentRequest(media_id=media_id), timeout=PATIENCE
            ):
                digest.update(chunk.data)
            assert digest.hexdigest() == sha256, media_id


def _run_fuzz(tmp_path: Path, body: str) -> dict[str, int]:
    with asyncio.Runner() as runner:
        harness = Harness(IngestServer(tmp_path / "ingest", config=IngestConfig()))
        runner.run(harness.start())
        try:
            if body == "unary":

                @FUZZ
                @given(request=upload_requests())
                def check(request: ipb.UploadMediaRequest) -> None:
                    runner.run(harness.upload(request))

            else:

                @settings(FUZZ, max_examples=max(10, EXAMPLES // 4))
                @given(case=stream_cases())
                def check(case: StreamCase) -> None:
                    runner.run(harness.upload_stream(case))

            check()
            runner.run(harness.still_healthy_and_intact())
        finally:
            runner.run(harness.server.stop())
        return harness.outcomes


def test_upload_media_answers_any_input_with_success_or_a_documented_refusal(
    tmp_path: Path,
) -> None:
    outcomes = _run_fuzz(tmp_path, "unary")
    # The inputs reached both sides of the service, not only its first check.
    assert outcomes.get("OK", 0) > 0
    assert len(outcomes) > 3, outcomes


def test_upload_media_stream_answers_any_input_with_success_or_a_documented_refusal(
    tmp_path: Path,
) -> None:
    outcomes = _run_fuzz(tmp_path, "stream")
    assert len(outcomes) > 2, outcomes


def test_the_documented_refusals_are_read_from_the_readme() -> None:
    assert DOCUMENTED["REQUEST_ID_REUSED"] == "ALREADY_EXISTS"
    assert DOCUMENTED["UNSUPPORTED_MEDIA_TYPE"] == "INVALID_ARGUMENT"
    assert DOCUMENTED["UPLOAD_STALLED"] == "DEADLINE_EXCEEDED"
    assert len(DOCUMENTED) >= 30
