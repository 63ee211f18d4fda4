"""What a file really is, decided from its bytes alone (never from its name or declared type).

Images are opened with Pillow and their structure is checked without decoding the pixels
where the format allows (a JPEG's segments up to its first scan and its end marker, a PNG's
chunk CRCs, a WebP's RIFF length): that catches truncated and mangled files at a fraction of a
decode's cost, which upload latency cannot afford. Damage inside the compressed pixel data
surfaces when the analyser decodes the image (a permanent ``IMAGE_UNDECODABLE`` failure).
Videos are recognised by their container signature. The content may be ``bytes`` or, for a
streamed upload, the received file mapped into memory: the checks touch only the pages they
read. Everything here is blocking: call it off the event loop.
"""

from __future__ import annotations

import io
import logging
import mmap
import struct
import warnings
from typing import IO, cast

from PIL import Image, UnidentifiedImageError

from ingest_service.config import UploadLimits
from ingest_service.domain.models import MediaKind, SniffedMedia
from ingest_service.errors import ContentCheckFailed, InvalidArgument, invalid

logger = logging.getLogger(__name__)

# Pillow format -> the content type ingest records. MPO is how Pillow names a JPEG with
# extra frames (stereo pairs, depth maps from phone cameras): a still JPEG to everyone else.
IMAGE_CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
_OPENED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

_JPEG_EOI = 0xD9
_JPEG_END_MARKER = b"\xff\xd9"
_JPEG_SOS = 0xDA
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# EXIF orientations that turn the stored image by 90 degrees.
_ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112

_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_EBML_HEADER_SCAN = 64
# How many leading bytes decide whether content is a video (see sniff_video).
VIDEO_SIGNATURE_BYTES = _EBML_HEADER_SCAN

# Whole content in memory, or a received file mapped read-only.
Content = bytes | mmap.mmap
# ISO base media files that are still images (HEIF, AVIF), not video.
_IMAGE_BRANDS = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}
)
# Leading bytes of the accepted image formats: a file that starts like one but that Pillow
# cannot open is a corrupt image, not an unknown type.
_IMAGE_SIGNATURES = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
)


def refuse_decompression_bombs() -> None:
    """Make Pillow's decompression-bomb warning an error, process-wide.

    Pillow only warns between its pixel limit and twice that; a service must refuse such an
    image, not decode it and log. The analysis analyser already treats the warning as an
    error, so both services in one process agree.
    """
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def sniff_video(content: Content) -> SniffedMedia | None:
    """The container of a video by its signature, or None when it is not one we accept.

    Only the first :data:`VIDEO_SIGNATURE_BYTES` bytes are looked at.
    """
    head = bytes(content[:VIDEO_SIGNATURE_BYTES])
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _IMAGE_BRANDS:
            return None
        content_type = "video/quicktime" if brand == b"qt  " else "video/mp4"
        return SniffedMedia(content_type, MediaKind.VIDEO, not_applicable_reason="video")
    if head.startswith(_EBML_MAGIC):
        # The EBML header names its DocType near the start: "webm" or "matroska".
        is_webm = b"webm" in head[:_EBML_HEADER_SCAN]
        content_type = "video/webm" if is_webm else "video/x-matroska"
        return SniffedMedia(content_type, MediaKind.VIDEO, not_applicable_reason="video")
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return SniffedMedia("video/x-msvideo", MediaKind.VIDEO, not_applicable_reason="video")
    return None


def sniff_image(content: Content, *, field: str, max_pixels: int) -> SniffedMedia | None:
    """The image in ``content`` after a cheap decode check, or None when it is not an image.

    Raises CORRUPT_IMAGE for a truncated or corrupt image and IMAGE_TOO_LARGE beyond
    ``max_pixels`` (a decompression bomb is refused before anything is decoded);
    CONTENT_CHECK_FAILED when the process itself fails meanwhile (out of descriptors or
    memory, an I/O error), which says nothing of the image.
    """
    if isinstance(content, mmap.mmap):
        content.seek(0)
        # An mmap reads, seeks and tells like a file: Pillow reads through it in place.
        source = cast(IO[bytes], content)
    else:
        source = io.BytesIO(content)
    try:
        with Image.open(source, formats=_OPENED_FORMATS) as image:
            width, height = image.size
            # Before anything is decoded: a bomb under Pillow's own limit is refused too.
            _check_pixels(width, height, field=field, max_pixels=max_pixels)
            image_format = image.format or ""
            animated = image_format != "MPO" and bool(getattr(image, "is_animated", False))
            rotated = _check_decodes(image, content)
    except InvalidArgument:
        raise
    except UnidentifiedImageError as exc:
        if _looks_like_image(content):
            raise invalid(field, "CORRUPT_IMAGE", "image header is unreadable") from exc
        return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise invalid(field, "IMAGE_TOO_LARGE", f"image exceeds {max_pixels} pixels") from exc
    except MemoryError as exc:
        raise _check_failed() from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        # Pillow reports damage with plain OSErrors; one with an errno came from the system
        # (a plugin's module or a codec could not be loaded), and its text names our files.
        if isinstance(exc, OSError) and exc.errno is not None:
            raise _check_failed() from exc
        raise invalid(field, "CORRUPT_IMAGE", f"image does not decode: {exc}") from exc
    except Exception as exc:
        # Pillow's parsers meet damaged input with more kinds of error than they document
        # (IndexError, KeyError, ...): whatever they raise, these bytes are no usable image.
        logger.info("image parser failed on %s with %s: %s", field, type(exc).__name__, exc)
        raise invalid(field, "CORRUPT_IMAGE", "image does not decode") from exc
    if rotated:
        width, height = height, width
    return SniffedMedia(
        IMAGE_CONTENT_TYPES[image_format],
        MediaKind.IMAGE,
        width=width,
        height=height,
        not_applicable_reason="animated" if animated else "",
    )


def _check_failed() -> ContentCheckFailed:
    return ContentCheckFailed(
        "the service could not check the image (its own failure, not the image's); retry"
    )


def _check_pixels(width: int, height: int, *, field: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise invalid(
            field,
            "IMAGE_TOO_LARGE",
            f"image of {width}x{height} pixels exceeds {max_pixels} pixels",
        )


def _looks_like_image(content: Content) -> bool:
    head = bytes(content[:16])
    is_webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    return is_webp or head.startswith(_IMAGE_SIGNATURES)


def _check_decodes(image: Image.Image, content: Content) -> bool:
    """Check ``image`` as cheaply as its format allows; True when EXIF turns it 90 degrees."""
    if image.format == "PNG":
        # verify() checks every chunk's CRC without decoding the pixels. (PNG's rare eXIf
        # chunk may follow the pixel data, so its orientation is not read.)
        image.verify()
        return False
    rotated = image.getexif().get(_EXIF_ORIENTATION) in _ROTATED_ORIENTATIONS
    if image.format in ("JPEG", "MPO"):
        _check_jpeg_structure(content)
    elif image.format == "WEBP":
        _check_riff_length(content)
    else:
        image.load()
    return rotated


def _check_jpeg_structure(content: Content) -> None:
    """Walk a JPEG's segments up to its first scan and find its end; raise ValueError if broken.

    In the compressed data 0xFF is always followed by 0x00 or a restart marker, never by
    0xD9, so a file cut short has no 0xFF 0xD9 after its scan header. Bytes after the end
    marker are allowed (cameras append thumbnails and MPO frames there). The search runs
    from the end: a whole file ends with the marker, so it costs next to nothing.
    """
    position, end = 2, len(content)
    while True:
        if position + 2 > end:
            raise ValueError("truncated: no end-of-image marker")
        if content[position] != 0xFF:
            raise ValueError(f"expected a marker at byte {position}")
        marker = content[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == _JPEG_EOI:
            raise ValueError("end-of-image marker before any scan")
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        if position + 4 > end:
            raise ValueError("truncated segment header")
        segment_end = position + 2 + int.from_bytes(content[position + 2 : position + 4], "big")
        if segment_end > end or segment_end < position + 4:
            raise ValueError(f"segment at byte {position} runs past the end")
        position = segment_end
        if marker == _JPEG_SOS:
            if content.rfind(_JPEG_END_MARKER, position) < 0:
                raise ValueError("truncated scan: no end-of-image marker")
            return


def _check_riff_length(content: Content) -> None:
    declared = int.from_bytes(content[4:8], "little") + 8
    if len(content) < declared:
        raise ValueError(f"truncated: {len(content)} of {declared} bytes")


def sniff(
    content: Content, *, limits: UploadLimits, index: int = 0, field: str | None = None
) -> SniffedMedia:
    """What file ``index`` of an upload is; refuses what ingest does not accept.

    Raises FILE_TOO_LARGE, UNSUPPORTED_MEDIA_TYPE, CORRUPT_IMAGE or IMAGE_TOO_LARGE, naming
    ``field`` (by default ``files[index].content``).
    """
    field = field or f"files[{index}].content"
    video = sniff_video(content)
    if video is not None:
        if len(content) > limits.max_video_bytes:
            raise _too_large(field, len(content), limits.max_video_bytes, "a video")
        return video
    if len(content) > limits.max_image_bytes:
        raise _too_large(field, len(content), limits.max_image_bytes, "an image")
    image = sniff_image(content, field=field, max_pixels=limits.max_image_pixels)
    if image is None:
        raise invalid(
            field,
            "UNSUPPORTED_MEDIA_TYPE",
            "not a supported image (JPEG, PNG, GIF, WebP, BMP, TIFF) "
            "or video (MP4, QuickTime, WebM, Matroska, AVI)",
        )
    return image


def _too_large(field: str, size: int, limit: int, what: str) -> InvalidArgument:
    return invalid(field, "FILE_TOO_LARGE", f"{size} bytes; {what} may have at most {limit}")
