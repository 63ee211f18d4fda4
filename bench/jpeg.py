"""Photo-like JPEG payloads for the benchmarks, each request's copy made byte-unique.

Random noise over smooth gradients and waves compresses roughly like a photograph, so the
encoder's quality is searched to land near the size asked for. A COM (comment) segment
right after the SOI marker makes every copy distinct while keeping it a valid JPEG, so no
server can skip a write by recognising content it already stored.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

_SOI = b"\xff\xd8"
_COM = b"\xff\xfe"
# A segment's length field is two bytes and counts itself.
_MAX_COMMENT_BYTES = 0xFFFF - 2
_LOWEST_QUALITY = 5
_HIGHEST_QUALITY = 95


@dataclass(frozen=True)
class Jpeg:
    """One encoded image and how it was made."""

    content: bytes
    width: int
    height: int
    quality: int


def photo_like_jpeg(seed: int, *, target_bytes: int, width: int = 1024, height: int = 768) -> Jpeg:
    """A JPEG of a photo-like picture, its quality chosen to come closest to ``target_bytes``."""
    picture = _photo_like_picture(seed, width, height)
    low, high = _LOWEST_QUALITY, _HIGHEST_QUALITY
    best = _encode(picture, high)
    # Size grows with quality: binary-search the quality whose size is nearest the target.
    while low <= high:
        quality = (low + high) // 2
        candidate = _encode(picture, quality)
        if abs(len(candidate.content) - target_bytes) < abs(len(best.content) - target_bytes):
            best = candidate
        if len(candidate.content) < target_bytes:
            low = quality + 1
        else:
            high = quality - 1
    return best


def with_comment(jpeg: bytes, comment: bytes) -> bytes:
    """``jpeg`` with a COM segment holding ``comment`` inserted right after its SOI marker."""
    if not jpeg.startswith(_SOI):
        raise ValueError("not a JPEG: no SOI marker")
    if len(comment) > _MAX_COMMENT_BYTES:
        raise ValueError(f"comment longer than {_MAX_COMMENT_BYTES} bytes")
    length = (len(comment) + 2).to_bytes(2, "big")
    return _SOI + _COM + length + comment + jpeg[len(_SOI) :]


def _photo_like_picture(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= width
    y /= height
    channels = []
    for _ in range(3):
        channel = rng.uniform(40, 200) + rng.uniform(-80, 80) * x + rng.uniform(-80, 80) * y
        for _ in range(4):
            frequency_x, frequency_y = rng.uniform(1, 8, 2) * 2 * math.pi
            phase = rng.uniform(0, 2 * math.pi)
            channel += rng.uniform(5, 30) * np.sin(frequency_x * x + frequency_y * y + phase)
        channels.append(channel)
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _encode(picture: Image.Image, quality: int) -> Jpeg:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return Jpeg(buffer.getvalue(), picture.width, picture.height, quality)
