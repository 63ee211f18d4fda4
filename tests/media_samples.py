"""Deterministic test media: photo-like images in every accepted format, video headers, and
broken files (truncated JPEG, decompression bomb). The same seed gives the same bytes;
different seeds give different content."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

Size = tuple[int, int]


def photo(seed: int, size: Size = (320, 240)) -> Image.Image:
    """A photo-like RGB image: a sky gradient, rippled ground, a few shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    top, bottom, ground = (rng.integers(0, 256, 3) for _ in range(3))
    horizon = int(height * rng.uniform(0.35, 0.75))
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = np.broadcast_to(top * (1 - rows) + bottom * rows, (height, width, 3)).copy()
    fx, fy = rng.uniform(0.02, 0.15, 2)
    ripple = np.sin(np.arange(width)[None, :] * fx + np.arange(height - horizon)[:, None] * fy)
    pixels[horizon:] = ground * (0.7 + 0.2 * ripple[..., None])
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, max(1, width - 8))), int(rng.integers(0, max(1, height - 8)))
        x1 = x0 + int(rng.integers(4, max(5, width // 2)))
        y1 = y0 + int(rng.integers(4, max(5, height // 2)))
        if rng.integers(0, 2):
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def jpeg_bytes(seed: int, size: Size = (320, 240), *, quality: int = 85) -> bytes:
    return encode(photo(seed, size), "JPEG", quality=quality)


def png_bytes(seed: int, size: Size = (320, 240)) -> bytes:
    return encode(photo(seed, size), "PNG")


def webp_bytes(seed: int, size: Size = (320, 240)) -> bytes:
    return encode(photo(seed, size), "WEBP", quality=80)


def bmp_bytes(seed: int, size: Size = (320, 240)) -> bytes:
    return encode(photo(seed, size), "BMP")


def tiff_bytes(seed: int, size: Size = (320, 240)) -> bytes:
    return encode(photo(seed, size), "TIFF", compression="tiff_deflate")


def gif_bytes(seed: int, size: Size = (320, 240)) -> bytes:
    """A still GIF (one frame)."""
    return encode(photo(seed, size).quantize(64), "GIF")


def animated_gif_bytes(seed: int, size: Size = (160, 120), *, frames: int = 3) -> bytes:
    """An animated GIF whose frames are different photos."""
    images = [photo(seed + i, size).quantize(64) for i in range(frames)]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)


def animated_webp_bytes(seed: int, size: Size = (160, 120), *, frames: int = 3) -> bytes:
    images = [photo(seed + i, size) for i in range(frames)]
    return encode(images[0], "WEBP", save_all=True, append_images=images[1:], duration=100)


def truncated_jpeg_bytes(seed: int, size: Size = (320, 240), *, keep: float = 0.6) -> bytes:
    """A JPEG cut off in the middle of its compressed data: the header reads, decoding fails."""
    whole = jpeg_bytes(seed, size)
    return whole[: int(len(whole) * keep)]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb_png_bytes(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, well-formed PNG that declares ``width`` x ``height`` 8-bit grey pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    # One scanline's worth of data: the pixel count is declared, never delivered.
    data = zlib.compress(b"\x00" * (width + 1))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def mp4_bytes(seed: int = 0, *, payload_bytes: int = 4096, brand: bytes = b"isom") -> bytes:
    """An ISO base media file: an ``ftyp`` box (major brand ``brand``) and an ``mdat`` box."""
    ftyp = _box(b"ftyp", brand + struct.pack(">I", 512) + b"isomiso2avc1mp41")
    mdat = _box(b"mdat", np.random.default_rng(seed).bytes(payload_bytes))
    return ftyp + mdat


def quicktime_bytes(seed: int = 0) -> bytes:
    return mp4_bytes(seed, brand=b"qt  ")


def _ebml_element(element_id: bytes, data: bytes) -> bytes:
    # Sizes below 127 bytes: one-byte vint with the marker bit set.
    return element_id + bytes([0x80 | len(data)]) + data


def webm_bytes(seed: int = 0, *, doc_type: bytes = b"webm", payload_bytes: int = 1024) -> bytes:
    """An EBML header naming ``doc_type`` (webm or matroska) followed by opaque data."""
    header = (
        _ebml_element(b"\x42\x86", b"\x01")  # EBMLVersion
        + _ebml_element(b"\x42\xf7", b"\x01")  # EBMLReadVersion
        + _ebml_element(b"\x42\x82", doc_type)  # DocType
        + _ebml_element(b"\x42\x87", b"\x04")  # DocTypeVersion
    )
    return _ebml_element(b"\x1a\x45\xdf\xa3", header) + np.random.default_rng(seed).bytes(
        payload_bytes
    )


def matroska_bytes(seed: int = 0) -> bytes:
    return webm_bytes(seed, doc_type=b"matroska")


def avi_bytes(seed: int = 0, *, payload_bytes: int = 1024) -> bytes:
    """A RIFF AVI container with one opaque LIST chunk."""
    body = b"AVI " + b"LIST" + struct.pack("<I", payload_bytes)
    body += np.random.default_rng(seed).bytes(payload_bytes)
    return b"RIFF" + struct.pack("<I", len(body)) + body
