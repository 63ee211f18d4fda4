"""Ingest's structural image checks: damage is refused without decoding the pixels."""

from __future__ import annotations

import errno
import mmap
from pathlib import Path

import pytest

from ingest_service.config import UploadLimits
from ingest_service.domain.sniff import sniff
from ingest_service.errors import ContentCheckFailed, InvalidArgument
from tests import media_samples as samples

LIMITS = UploadLimits()


def refusal_reason(content: bytes) -> str | None:
    """The reason ``content`` is refused with, or None when it is accepted."""
    try:
        sniff(content, index=0, limits=LIMITS)
    except InvalidArgument as refused:
        return refused.reason
    return None


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_cut_anywhere_after_its_header_is_corrupt(progressive: bool) -> None:
    whole = samples.encode(samples.photo(3), "JPEG", quality=85, progressive=progressive)
    assert refusal_reason(whole) is None
    # Every cut from the first scan to just before the end marker.
    for cut in range(len(whole) // 4, len(whole) - 1, max(1, len(whole) // 97)):
        assert refusal_reason(whole[:cut]) == "CORRUPT_IMAGE", cut
    assert refusal_reason(whole[:-1]) == "CORRUPT_IMAGE"


def test_bytes_after_the_end_marker_are_allowed() -> None:
    # Cameras append data after EOI; an MPO is two JPEGs back to back.
    first, second = samples.jpeg_bytes(1), samples.jpeg_bytes(2)
    assert refusal_reason(first + b"\x00trailer") is None
    assert refusal_reason(first + second) is None


def test_a_jpeg_with_a_mangled_segment_is_corrupt() -> None:
    whole = bytearray(samples.jpeg_bytes(4))
    sos = whole.index(b"\xff\xda")
    # A segment length that runs past the end of the file.
    mangled = bytearray(whole)
    mangled[sos + 2 : sos + 4] = b"\xff\xff"
    assert refusal_reason(bytes(mangled)) == "CORRUPT_IMAGE"
    # Garbage where the next marker should be.
    dqt = whole.index(b"\xff\xdb")
    length = int.from_bytes(whole[dqt + 2 : dqt + 4], "big")
    mangled = bytearray(whole)
    mangled[dqt + 2 + length] = 0x00
    assert refusal_reason(bytes(mangled)) == "CORRUPT_IMAGE"


def test_a_truncated_webp_is_corrupt() -> None:
    whole = samples.webp_bytes(5)
    assert refusal_reason(whole) is None
    assert refusal_reason(whole[: len(whole) * 2 // 3]) == "CORRUPT_IMAGE"


@pytest.mark.parametrize(
    "make", [samples.png_bytes, samples.gif_bytes, samples.bmp_bytes, samples.tiff_bytes]
)
def test_other_formats_cut_short_are_corrupt(make: object) -> None:
    assert callable(make)
    whole: bytes = make(6)
    assert refusal_reason(whole) is None
    assert refusal_reason(whole[: len(whole) * 2 // 3]) == "CORRUPT_IMAGE"


class _FailingFile(mmap.mmap):
    """A received file whose reads fail as the system's do when the process is out of
    descriptors (the error names one of the server's own files)."""

    def read(self, size: int | None = -1) -> bytes:
        raise OSError(errno.EMFILE, "Too many open files", "/srv/site-packages/PIL/Bmp.py")


def test_a_failure_of_the_process_is_not_the_images_fault(tmp_path: Path) -> None:
    path = tmp_path / "received"
    path.write_bytes(samples.jpeg_bytes(6))
    with (
        path.open("rb") as file,
        _FailingFile(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
        pytest.raises(ContentCheckFailed) as failed,
    ):
        sniff(mapped, field="chunk", limits=LIMITS)
    assert "/" not in failed.value.message
    assert failed.value.reason == "CONTENT_CHECK_FAILED"
    # The cause, path and all, stays for the log.
    assert isinstance(failed.value.__cause__, OSError)
