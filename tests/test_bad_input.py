"""Bad input to UploadMedia beyond tests/test_ingest_service.py's cases: every refusal of
SPEC section 7 names its status, reason and field (with the file's index), a bad item rejects
its whole batch wherever it sits, nothing of a refused batch is stored, and the limits are
the configured ones. (The stream's refusals are in tests/test_upload_stream.py.)"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from ingest_service.config import IngestConfig, UploadLimits
from mediatag_cli.main import parse
from mediatag_cli.settings import serve_settings
from mediatag_common.grpc_server import open_channel
from tests import media_samples as samples
from tests.conftest import PATIENCE
from tests.ingest_support import OWNER, IngestServer, assert_refused, listed, refusal
from tests.test_auth import TOKENS, tokens_file

GOOD = [samples.jpeg_bytes(60 + n) for n in range(3)]


def _png_with_bad_crc() -> bytes:
    png = bytearray(samples.png_bytes(61))
    # The last byte of the IDAT chunk's data: its CRC no longer matches.
    idat = png.find(b"IDAT")
    length = struct.unpack(">I", png[idat - 4 : idat])[0]
    png[idat + 4 + length - 1] ^= 0xFF
    return bytes(png)


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small, well-formed JPEG whose frame header declares ``width`` x ``height``."""
    jpeg = bytearray(samples.jpeg_bytes(62, (64, 48)))
    frame = jpeg.find(b"\xff\xc0")
    jpeg[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(jpeg)


def _gif_declaring(width: int, height: int) -> bytes:
    gif = bytearray(samples.gif_bytes(63, (16, 16)))
    gif[6:10] = struct.pack("<HH", width, height)
    return bytes(gif)


def _zip_bytes() -> bytes:
    data = b"hello" * 100
    return b"PK\x03\x04" + struct.pack("<I", zlib.crc32(data)) + data


# name -> (content, filename, declared type, reason)
BAD_CONTENT: dict[str, tuple[bytes, str, str, str]] = {
    "random-bytes-named-mp4": (
        bytes(range(256)) * 40,
        "clip.mp4",
        "video/mp4",
        "UNSUPPORTED_MEDIA_TYPE",
    ),
    "pdf-named-png": (
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" * 50,
        "scan.png",
        "image/png",
        "UNSUPPORTED_MEDIA_TYPE",
    ),
    "zip-named-jpeg": (_zip_bytes(), "photo.jpeg", "image/jpeg", "UNSUPPORTED_MEDIA_TYPE"),
    "html-named-webp": (
        b"<!doctype html><p>hi</p>" * 20,
        "a.webp",
        "image/webp",
        "UNSUPPORTED_MEDIA_TYPE",
    ),
    "heic-still-image": (
        samples.mp4_bytes(brand=b"heic"),
        "IMG_0001.HEIC",
        "image/heic",
        "UNSUPPORTED_MEDIA_TYPE",
    ),
    "single-byte": (b"\xff", "x.jpg", "image/jpeg", "UNSUPPORTED_MEDIA_TYPE"),
    "jpeg-signature-then-garbage": (
        b"\xff\xd8\xff" + b"\x00garbage" * 50,
        "x.jpg",
        "image/jpeg",
        "CORRUPT_IMAGE",
    ),
    "png-with-a-bad-crc": (_png_with_bad_crc(), "x.png", "image/png", "CORRUPT_IMAGE"),
    "truncated-png": (samples.png_bytes(64)[:3000], "x.png", "", "CORRUPT_IMAGE"),
    "truncated-webp": (samples.webp_bytes(65)[:2000], "x.webp", "", "CORRUPT_IMAGE"),
    "truncated-gif": (samples.gif_bytes(66)[:1500], "x.gif", "", "CORRUPT_IMAGE"),
    # Found by tests/test_upload_fuzz.py: Pillow fails on this cut with struct.error.
    "animated-gif-cut-in-its-second-frame-header": (
        samples.animated_gif_bytes(84, (24, 24), frames=2)[:790],
        "x.gif",
        "image/gif",
        "CORRUPT_IMAGE",
    ),
    "truncated-bmp": (samples.bmp_bytes(67)[:5000], "x.bmp", "", "CORRUPT_IMAGE"),
    "truncated-tiff": (samples.tiff_bytes(68)[:3000], "x.tif", "", "CORRUPT_IMAGE"),
    "jpeg-bomb": (_jpeg_declaring(65_000, 65_000), "bomb.jpg", "image/jpeg", "IMAGE_TOO_LARGE"),
    "gif-bomb": (_gif_declaring(65_000, 65_000), "bomb.gif", "image/gif", "IMAGE_TOO_LARGE"),
    "png-bomb": (samples.decompression_bomb_png_bytes(), "bomb.png", "", "IMAGE_TOO_LARGE"),
}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[IngestServer]:
    runner = IngestServer(tmp_path / "ingest")
    yield runner
    await runner.stop()


async def _refused_and_nothing_stored(
    server: IngestServer,
    stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    request: ipb.UploadMediaRequest,
    reason: str,
    field_name: str,
) -> None:
    """``request`` is INVALID_ARGUMENT ``reason`` naming ``field_name``, and neither a row
    nor a blob of it stays behind."""
    small = samples.gif_bytes(72, (8, 8))
    await stub.UploadMedia(
        ipb.UploadMediaRequest(owner_id=OWNER, files=[ipb.MediaFile(content=small)]),
        timeout=PATIENCE,
    )
    listed_before = await listed(stub)
    blobs_before = server.blob_files()

    error = await refusal(stub.UploadMedia(request, timeout=PATIENCE))

    assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, reason, field_name)
    assert await listed(stub) == listed_before
    assert server.blob_files() == blobs_before


@pytest.mark.parametrize("case", list(BAD_CONTENT))
@pytest.mark.parametrize("index", [0, 1, 3])
async def test_content_that_is_no_supported_media_rejects_the_batch(
    server: IngestServer, case: str, index: int
) -> None:
    content, filename, content_type, reason = BAD_CONTENT[case]
    files = [ipb.MediaFile(filename=f"good{n}.jpg", content=c) for n, c in enumerate(GOOD)]
    files.insert(
        index, ipb.MediaFile(filename=filename, content_type=content_type, content=content)
    )

    stub = await server.start()
    await _refused_and_nothing_stored(
        server,
        stub,
        ipb.UploadMediaRequest(owner_id=OWNER, files=files),
        reason,
        f"files[{index}].content",
    )


async def test_the_first_bad_item_is_the_one_named(server: IngestServer) -> None:
    files = [
        ipb.MediaFile(content=GOOD[0]),
        ipb.MediaFile(content=samples.truncated_jpeg_bytes(69)),
        ipb.MediaFile(content=b""),
    ]
    # Emptiness is judged before the bytes are looked into: the empty file at 2 is named.
    stub = await server.start()
    await _refused_and_nothing_stored(
        server,
        stub,
        ipb.UploadMediaRequest(owner_id=OWNER, files=files),
        "EMPTY_FILE",
        "files[2].content",
    )


# -- configured limits -----------------------------------------------------------------------

LIMITED = UploadLimits(
    max_files=3,
    # Videos may be larger than images: the image limit applies once the bytes say "image".
    max_image_bytes=12_000,
    max_video_bytes=40_000,
    max_image_pixels=10_000,
    max_owner_id_length=16,
    max_category_length=8,
    max_context_entries=2,
    max_context_value_length=10,
    max_filename_length=12,
)

LIMIT_CASES: dict[str, tuple[dict[str, object], str, str]] = {
    "too-many-files": (
        {"files": [ipb.MediaFile(content=samples.gif_bytes(n, (8, 8))) for n in range(4)]},
        "TOO_MANY_FILES",
        "files",
    ),
    "image-over-the-byte-limit": (
        {
            "files": [
                ipb.MediaFile(content=samples.gif_bytes(1, (8, 8))),
                ipb.MediaFile(content=samples.png_bytes(70, (90, 100))),
            ]
        },
        "FILE_TOO_LARGE",
        "files[1].content",
    ),
    "video-over-the-byte-limit": (
        {"files": [ipb.MediaFile(content=samples.mp4_bytes(payload_bytes=41_000))]},
        "FILE_TOO_LARGE",
        "files[0].content",
    ),
    "image-over-the-pixel-limit": (
        # 120 x 100 pixels in a file of a few KB: a decompression bomb by this limit.
        {"files": [ipb.MediaFile(content=samples.jpeg_bytes(71, (120, 100)))]},
        "IMAGE_TOO_LARGE",
        "files[0].content",
    ),
    "owner-id-too-long": ({"owner_id": "o" * 17}, "INVALID_OWNER_ID", "owner_id"),
    "category-too-long": ({"category": "c" * 9}, "INVALID_CATEGORY", "category"),
    "too-many-context-entries": (
        {"context": {"a": "1", "b": "2", "c": "3"}},
        "INVALID_CONTEXT",
        "context",
    ),
    "context-value-too-long": ({"context": {"a": "v" * 11}}, "INVALID_CONTEXT", "context"),
    "filename-too-long": (
        {"files": [ipb.MediaFile(filename="f" * 13, content=samples.gif_bytes(1, (8, 8)))]},
        "INVALID_FILENAME",
        "files[0].filename",
    ),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
async def test_the_configured_limits_are_the_ones_enforced(tmp_path: Path, case: str) -> None:
    changes, reason, field_name = LIMIT_CASES[case]
    server = IngestServer(tmp_path / "ingest", config=IngestConfig(limits=LIMITED))
    fields: dict[str, object] = {
        "owner_id": OWNER,
        "files": [ipb.MediaFile(content=samples.gif_bytes(1, (8, 8)))],
        **changes,
    }
    try:
        stub = await server.start()
        # Just inside every limit: accepted.
        inside = await stub.UploadMedia(
            ipb.UploadMediaRequest(
                owner_id="o" * 16,
                category="c" * 8,
                context={"a": "v" * 10, "b": ""},
                files=[
                    ipb.MediaFile(filename="f" * 12, content=samples.gif_bytes(n, (100, 100)))
                    for n in range(3)
                ],
            ),
            timeout=PATIENCE,
        )
        assert inside.count == 3
        await _refused_and_nothing_stored(
            server,
            stub,
            ipb.UploadMediaRequest(**fields),  # type: ignore[arg-type]
            reason,
            field_name,
        )
    finally:
        await server.stop()


# -- other malformed requests ----------------------------------------------------------------

MALFORMED: dict[str, tuple[dict[str, object], str, str]] = {
    "owner-id-with-a-slash": ({"owner_id": "a/b"}, "INVALID_OWNER_ID", "owner_id"),
    "owner-id-with-a-space": ({"owner_id": "listing 1"}, "INVALID_OWNER_ID", "owner_id"),
    "owner-id-not-ascii": ({"owner_id": "lïsting"}, "INVALID_OWNER_ID", "owner_id"),
    "category-with-a-newline": ({"category": "Hair\nCut"}, "INVALID_CATEGORY", "category"),
    "empty-context-key": ({"context": {"": "x"}}, "INVALID_CONTEXT", "context"),
    "context-key-too-long": ({"context": {"k" * 129: "x"}}, "INVALID_CONTEXT", "context"),
    # Terminal escapes (CSI as one C1 character) and a right-to-left override that shows
    # "photo\u202egpj.exe" as "photoexe.jpg".
    "filename-with-a-csi": (
        {"files": [ipb.MediaFile(filename="\x9b31mred\x85.jpg", content=GOOD[0])]},
        "INVALID_FILENAME",
        "files[0].filename",
    ),
    "filename-with-a-bidi-override": (
        {"files": [ipb.MediaFile(filename="photo\u202egpj.exe", content=GOOD[0])]},
        "INVALID_FILENAME",
        "files[0].filename",
    ),
    "category-with-a-csi": ({"category": "Hair\x9b2J"}, "INVALID_CATEGORY", "category"),
    "category-with-an-isolate": ({"category": "a\u2067b"}, "INVALID_CATEGORY", "category"),
    "context-key-with-an-escape": ({"context": {"k\x1b[2J": "x"}}, "INVALID_CONTEXT", "context"),
    "filename-with-a-nul": (
        {"files": [ipb.MediaFile(filename="a\x00.jpg", content=GOOD[0])]},
        "INVALID_FILENAME",
        "files[0].filename",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_metadata_is_refused(server: IngestServer, case: str) -> None:
    changes, reason, field_name = MALFORMED[case]
    fields: dict[str, object] = {
        "owner_id": OWNER,
        "files": [ipb.MediaFile(content=GOOD[1])],
        **changes,
    }

    stub = await server.start()
    await _refused_and_nothing_stored(
        server,
        stub,
        ipb.UploadMediaRequest(**fields),  # type: ignore[arg-type]
        reason,
        field_name,
    )


async def test_the_joiners_of_emoji_and_persian_names_are_ordinary_text(
    server: IngestServer,
) -> None:
    stub = await server.start()
    filename, category = (
        "\U0001f469\u200d\U0001f4bb.jpg",
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
    )
    response = await stub.UploadMedia(
        ipb.UploadMediaRequest(
            owner_id=OWNER,
            category=category,
            files=[ipb.MediaFile(filename=filename, content=GOOD[2])],
        )
    )
    (media,) = response.media
    assert (media.filename, media.category) == (filename, category)


# -- the limits come from flags and environment ------------------------------------------------


def test_every_upload_limit_is_a_flag_and_an_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith("MEDIATAG_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MEDIATAG_MAX_CONTEXT_ENTRIES", "5")
    monkeypatch.setenv("MEDIATAG_REQUEST_ID_RETENTION", "172800")
    command_line = (
        "serve ingest --max-files 4 --max-image-bytes 2MiB --max-image-pixels 5000 "
        "--max-video-bytes 1GiB --max-owner-id-length 20 --max-category-length 30 "
        "--max-context-value-length 40 --max-filename-length 50 --upload-idle-timeout 7 "
        "--request-id-retention 3600"
    )
    args = parse(command_line.split())

    ingest = serve_settings(args, ["ingest"]).ingest

    assert ingest is not None
    assert ingest.limits == UploadLimits(
        max_files=4,
        max_image_bytes=2 * 1024 * 1024,
        max_image_pixels=5000,
        max_video_bytes=1024 * 1024 * 1024,
        max_owner_id_length=20,
        max_category_length=30,
        max_context_entries=5,
        max_context_value_length=40,
        max_filename_length=50,
    )
    # The flag wins over the environment.
    assert (ingest.request_id_retention, ingest.stream_idle_timeout) == (3600.0, 7.0)


async def test_media_ids_longer_than_any_issued_are_refused_naming_the_field(
    tmp_path: Path,
) -> None:
    server = IngestServer(
        tmp_path / "ingest", config=IngestConfig(tokens_file=tokens_file(tmp_path / "secrets"))
    )
    await server.start()
    channels = [
        open_channel(f"127.0.0.1:{server.port}", token=TOKENS[who])
        for who in ("admin", "uploader7")
    ]
    try:
        long_id = "x" * 100_000
        for stub in map(ingest_pb2_grpc.IngestServiceStub, channels):
            stored = await stub.UploadMedia(
                ipb.UploadMediaRequest(
                    owner_id="listing-7", files=[ipb.MediaFile(filename="a.jpg", content=GOOD[0])]
                ),
                timeout=PATIENCE,
            )
            calls: dict[str, Awaitable[Any]] = {
                "media_id": stub.GetMedia(ipb.GetMediaRequest(media_id=long_id), timeout=PATIENCE),
                "media_ids[1]": stub.ReprocessMedia(
                    ipb.ReprocessMediaRequest(media_ids=[stored.media[0].id, long_id]),
                    timeout=PATIENCE,
                ),
            }
            for field, call in calls.items():
                refused = await refusal(call)
                assert_refused(
                    refused, grpc.StatusCode.INVALID_ARGUMENT, "MEDIA_ID_TOO_LONG", field
                )
                assert len(refused.details() or "") < 200
            read = stub.ReadMediaContent(
                ipb.ReadMediaContentRequest(media_id=long_id), timeout=PATIENCE
            )
            refused = await refusal(read.read())
            assert_refused(
                refused, grpc.StatusCode.INVALID_ARGUMENT, "MEDIA_ID_TOO_LONG", "media_id"
            )
            # The longest id issued is still looked up as before.
            missing = await refusal(
                stub.GetMedia(ipb.GetMediaRequest(media_id="0" * 36), timeout=PATIENCE)
            )
            assert missing.code() in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.PERMISSION_DENIED,
            )
    finally:
        for channel in channels:
            await channel.close()
        await server.stop()
