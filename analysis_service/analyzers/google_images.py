"""Images as Google's APIs take them: within their size and pixel limits, in a format they read.

An image that already fits is sent as it is, byte for byte. One that does not (over the bytes or
pixel limit, or in a format the API does not read) is decoded, downscaled to fit and re-encoded:
JPEG, or PNG when it has transparency. Never rejected for its size.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass

from PIL import Image, ImageOps

from analysis_service.analyzers.image_modes import has_alpha, to_8_bit
from analysis_service.errors import PermanentAnalyzerError

logger = logging.getLogger(__name__)

# What each API reads (MIME types as ingest sniffs them).
VISION_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/gif", "image/bmp", "image/webp", "image/tiff"}
)
EMBEDDING_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/bmp"})
GEMINI_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})

_JPEG_QUALITY = 90
# Each re-encoding that is still too large shrinks the next one by at least this much.
_MAX_SHRINK = 0.9
_MAX_ROUNDS = 8


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class UploadImage:
    """Bytes to send and their MIME type."""

    content: bytes
    mime_type: str
    width: int
    height: int


def open_upload(content: bytes, mime_type: str) -> UploadImage:
    """The image as uploaded; reads the header only."""
    try:
        with Image.open(io.BytesIO(content)) as image:
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PermanentAnalyzerError(str(exc), reason="IMAGE_TOO_LARGE") from exc
    except Exception as exc:
        raise PermanentAnalyzerError(
            f"image cannot be decoded: {exc}", reason="IMAGE_UNDECODABLE"
        ) from exc
    return UploadImage(content, mime_type, width, height)


def fits(image: UploadImage, accepted: frozenset[str], limits: ImageLimits) -> bool:
    """Whether an API that reads ``accepted`` types within ``limits`` takes ``image`` as it is."""
    return (
        image.mime_type in accepted
        and len(image.content) <= limits.max_bytes
        and image.width * image.height <= limits.max_pixels
    )


def fit(image: UploadImage, accepted: frozenset[str], limits: ImageLimits) -> UploadImage:
    """``image`` itself if the API takes it, else a downscaled/re-encoded copy that it takes."""
    if fits(image, accepted, limits):
        return image
    pixels = image.width * image.height
    scale = min(1.0, math.sqrt(limits.max_pixels / pixels)) if pixels else 1.0
    try:
        fitted = _reencode(image, scale, limits)
    except PermanentAnalyzerError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PermanentAnalyzerError(str(exc), reason="IMAGE_TOO_LARGE") from exc
    except MemoryError as exc:
        raise PermanentAnalyzerError("image too large to decode", reason="IMAGE_TOO_LARGE") from exc
    except Exception as exc:
        raise PermanentAnalyzerError(
            f"image cannot be decoded: {exc}", reason="IMAGE_UNDECODABLE"
        ) from exc
    logger.debug(
        "re-encoded a %dx%d %s (%d bytes) as a %dx%d %s (%d bytes)",
        image.width,
        image.height,
        image.mime_type,
        len(image.content),
        fitted.width,
        fitted.height,
        fitted.mime_type,
        len(fitted.content),
    )
    return fitted


def _reencode(image: UploadImage, scale: float, limits: ImageLimits) -> UploadImage:
    with Image.open(io.BytesIO(image.content)) as opened:
        # JPEG only: libjpeg scales by 1/2..1/8 while decoding, to no less than the request.
        opened.draft("RGB", _scaled((image.width, image.height), scale))
        # High bit depths scaled to 8 bits: converted directly, they would clip or truncate.
        decoded = to_8_bit(ImageOps.exif_transpose(opened))
    transparent = has_alpha(decoded)
    mode = "RGBA" if transparent else "L" if decoded.mode == "L" else "RGB"
    working = decoded if decoded.mode == mode else decoded.convert(mode)
    # Draft decoding and EXIF rotation change the size: fit what was decoded.
    width, height = working.size
    target = _scaled(working.size, min(1.0, math.sqrt(limits.max_pixels / (width * height))))
    for _ in range(_MAX_ROUNDS):
        resized = working
        if target != working.size:
            # Bilinear: Pillow scales its support with the factor (no aliasing), and it is
            # twice as fast as Lanczos on a 75-megapixel image; the APIs downscale further.
            resized = working.resize(target, Image.Resampling.BILINEAR)
        content, mime_type = _encode(resized, transparent)
        if len(content) <= limits.max_bytes:
            return UploadImage(content, mime_type, *resized.size)
        shrink = min(_MAX_SHRINK, math.sqrt(limits.max_bytes / len(content)))
        target = _scaled(resized.size, shrink)
    raise PermanentAnalyzerError(
        f"image does not fit in {limits.max_bytes} bytes even downscaled",
        reason="IMAGE_TOO_LARGE",
    )


def _scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    # Floor, so the pixel count cannot round up past the limit.
    return max(1, int(size[0] * scale)), max(1, int(size[1] * scale))


def _encode(image: Image.Image, transparent: bool) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    if transparent:
        image.save(buffer, format="PNG", optimize=False)
        return buffer.getvalue(), "image/png"
    image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue(), "image/jpeg"
