"""The offline ``local`` analyser: real measurements with Pillow and numpy, no network.

Tags are lower-case and hyphenated. A facet with several values is tagged ``<facet>-<value>``; a
yes/no property is one word, present only when true. They come in this fixed order:

- ``animated``: more than one frame in an animation format (GIF, APNG, WebP, FLI, AVIF).
- ``transparent``: the alpha channel is used (some pixel is not fully opaque).
- ``dominant-<colour>``: the most frequent named colour of the visible pixels, then up to two more
  that cover at least 20 % of them, most frequent first. Names: red, orange, yellow, green, teal,
  blue, purple, pink, brown, black, white, gray.
- ``colorfulness-<monochrome|muted|colorful|vivid>``: Hasler-Süsstrunk metric (<10, <33, <60, more).
- ``brightness-<dark|medium|bright>``: mean CIE L* of the visible pixels (below 30, above 75).
- ``sharpness-<sharp|blurry>``: variance of the Laplacian of the grayscale working image; omitted
  for flat images, where there is no detail to be sharp or blurred.
- ``orientation-<landscape|portrait|square>``: after EXIF orientation.
- ``size-<small|medium|large|very-large>``: megapixels of the full image (<0.5, <2, <8, more).

Colour facets are omitted when no pixel is visible. Animated images are measured on their first
frame.

The embedding is described in :mod:`analysis_service.analyzers.local_embedding`; colours are
named with the palette of :mod:`analysis_service.analyzers.colours`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image

from analysis_service.analyzers.base import AnalysisInput, AnalysisOutput, ApiLimit, RateLimiter
from analysis_service.analyzers.colours import (
    COLOUR_NAMES,
    ByteArray,
    FloatArray,
    colour_names,
    srgb_lightness,
)
from analysis_service.analyzers.image_modes import to_rgb_or_rgba
from analysis_service.analyzers.local_embedding import embedding
from analysis_service.errors import PermanentAnalyzerError, TransientAnalyzerError

logger = logging.getLogger(__name__)

_WORK_SIDE = 256
# Modes Pillow resamples in place, band by band, and converts to RGB band by band: shrinking
# before converting gives the image converting first gave, with no full-size copy. (With alpha,
# Pillow premultiplies a full-size copy first.)
_RESAMPLED_MODES = frozenset({"RGB", "L"})
# The other modes are converted a strip of about this many pixels at a time, each strip averaged
# down to at least twice the working size (as Pillow's thumbnail reduces before it resamples).
_STRIP_PIXELS = 1 << 20
_REDUCING_GAP = 2
# EXIF orientation: the transposition that shows the image upright (ImageOps.exif_transpose's,
# applied here to the working image instead of the full-size one). 5 to 8 turn it a quarter.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
_ANIMATION_FORMATS = frozenset({"GIF", "PNG", "WEBP", "FLI", "AVIF"})
# Analysis processes yield the CPU to the service's own process: serving RPCs and watch
# streams is what callers wait on; analysis is background work that takes what is left
# (idle scheduling class where there is one, else this niceness).
_PROCESS_NICENESS = 10
# Thread pools of the numeric libraries, held to one thread in the analysis processes: there
# is one process per CPU already, and OpenBLAS's threads busy-wait. Two processes with two
# threads each on two cores took three minutes over the embedding's first QR decomposition
# (0.2 s alone). The libraries read these when they load, so the children must inherit them.
_LIBRARY_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

_SECONDARY_COLOUR_SHARE = 0.2
_MAX_DOMINANT_COLOURS = 3

_COLOURFULNESS_CLASSES = ((10.0, "monochrome"), (33.0, "muted"), (60.0, "colorful"))
_DARK_LIGHTNESS = 30.0
_BRIGHT_LIGHTNESS = 75.0
# On the working image, sharp photos measure in the hundreds or thousands; a blur of about
# 1.5 working pixels brings them below 30.
_SHARP_LAPLACIAN_VARIANCE = 60.0
_FLAT_GRAY_STD = 4.0
_SQUARE_TOLERANCE = 1.05
_SIZE_CLASSES = ((0.5, "small"), (2.0, "medium"), (8.0, "large"))


@dataclass(frozen=True)
class _Decoded:
    """The working image (RGB, at most ``_WORK_SIDE`` on the long side) and what decoding saw."""

    rgb: Image.Image
    alpha: FloatArray | None
    width: int
    height: int
    animated: bool


class LocalAnalyzer:
    """Measures images offline; see the module docstring for the tags and the embedding.

    With ``processes`` > 0 the measurements run in that many child processes (at idle
    CPU priority): numpy on small images holds the GIL most of the time, and in the
    service's process it would take it from the event loop that serves uploads and
    watchers. With 0 they run on a thread of the calling process.

    When a process dies (killed, out of memory), its pool fails every job it holds without
    knowing whose image was being measured. Those jobs are measured again one at a time, each
    alone in a process of its own: only a job whose process dies then is failed (an attempt).
    """

    name = "local"
    version = "1.0"

    def __init__(self, embedding_dimensions: int = 1408, *, processes: int = 0) -> None:
        if embedding_dimensions < 1:
            raise ValueError("embedding_dimensions must be positive")
        if processes < 0:
            raise ValueError("processes must not be negative")
        self._dimensions = embedding_dimensions
        self._processes = processes
        self._pool = _ProcessPool(processes, embedding_dimensions)
        self._solo_pool = _ProcessPool(1, embedding_dimensions)
        self._solo_turn = asyncio.Lock()

    @property
    def api_limits(self) -> Sequence[ApiLimit]:
        return (ApiLimit("local", rate_per_second=2.0, burst=1),)

    def cache_inputs(self, category: str, context: Mapping[str, str]) -> Mapping[str, str]:
        # Category and context do not change what is measured, so they are not part of the key.
        return {"dimensions": str(self._dimensions)}

    async def analyze(self, item: AnalysisInput, limiter: RateLimiter) -> AnalysisOutput:
        await limiter.acquire(self.name)
        if not self._processes:
            return await asyncio.to_thread(_analyze_bytes, item.content, self._dimensions)
        # Failed by a dying process that may have been measuring another job's image: no
        # attempt is charged for that; the image is measured again, alone.
        with contextlib.suppress(BrokenProcessPool):
            return await self._pool.analyze(item.content)
        return await self._analyze_alone(item.content)

    async def _analyze_alone(self, content: bytes) -> AnalysisOutput:
        """Measure ``content`` in a process measuring nothing else, so that if the process dies
        this image's attempt fails, and no other job's. Once per call: a job that keeps killing
        its process fails after its attempts."""
        async with self._solo_turn:
            try:
                return await self._solo_pool.analyze(content)
            except BrokenProcessPool as exc:
                raise TransientAnalyzerError(
                    f"an analysis process died measuring this image alone: {exc}"
                ) from exc
            except asyncio.CancelledError:
                # The measurement goes on in the process: the next image to be measured alone
                # would wait behind it, and be blamed if it killed the process.
                self._solo_pool.abandon()
                raise

    async def aclose(self) -> None:
        """Stop the analysis processes; a measurement still running is abandoned."""
        await self._pool.aclose()
        await self._solo_pool.aclose()


class _ProcessPool:
    """Analysis processes, started at the first call and again after one of them died."""

    def __init__(self, processes: int, dimensions: int) -> None:
        self._processes = processes
        self._dimensions = dimensions
        self._pool: ProcessPoolExecutor | None = None

    async def analyze(self, content: bytes) -> AnalysisOutput:
        """Measure ``content``; BrokenProcessPool if a process died meanwhile (the pool then
        fails every job it holds, and the next call starts a new one)."""
        pool = self._pool
        if pool is None:
            for variable in _LIBRARY_THREAD_VARIABLES:
                os.environ.setdefault(variable, "1")
            pool = self._pool = ProcessPoolExecutor(
                self._processes,
                # Not fork: the service's process runs gRPC's and the database's threads.
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_child,
                initargs=(os.getpid(), self._dimensions),
            )
        try:
            return await asyncio.get_running_loop().run_in_executor(
                pool, _analyze_bytes, content, self._dimensions
            )
        except BrokenProcessPool:
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise

    def abandon(self) -> None:
        """Kill the processes without waiting for them; the next call starts new ones."""
        pool, self._pool = self._pool, None
        if pool is not None:
            _kill_processes(pool)
            pool.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(_kill_pool, pool)


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    # Killed, not asked to leave: at idle priority, beside programs that keep the cores busy,
    # the processes took minutes to exit on their own, and the service with them. They hold
    # nothing but a measurement (the service is past its drain). The pool has no public way
    # to kill its processes before Python 3.14 (kill_workers).
    _kill_processes(pool)
    pool.shutdown(wait=True, cancel_futures=True)


def _kill_processes(pool: ProcessPoolExecutor) -> None:
    for child in list((pool._processes or {}).values()):
        child.kill()


def _start_child(parent_pid: int, dimensions: int) -> None:
    # The first analysis in a process costs some 0.6 s of CPU more than the next ones (the
    # embedding's projection, the decoders' set-up): paid here, at the service's priority.
    # At idle priority, beside programs that keep the cores busy, it held the process's first
    # job for a minute and more.
    _analyze_bytes(_warm_up_image(), dimensions)
    os.nice(_PROCESS_NICENESS)
    if hasattr(os, "SCHED_IDLE"):
        # Linux: run only on CPU time nothing else wants. A niced process still takes its
        # share of a busy machine, and each time it holds a core when the service's event
        # loop wakes, a thousand watch streams wait: with 1,000 watchers on two cores this
        # made the difference between a watcher's p50 delay of 1.8 s and 0.1 s.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    # A parent killed with SIGKILL cannot stop its pool: the child notices and leaves.
    threading.Thread(
        target=_exit_with_parent, args=(parent_pid,), name="parent-watch", daemon=True
    ).start()


def _warm_up_image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 140, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _analyze_bytes(content: bytes, dimensions: int) -> AnalysisOutput:
    decoded = _decode(content)
    return AnalysisOutput(_tags(decoded), embedding(decoded.rgb, dimensions))


def _decode(content: bytes) -> _Decoded:
    """Decode to the working size as cheaply as the format allows; every failure is permanent."""
    try:
        with Image.open(io.BytesIO(content)) as image:
            width, height = image.size
            animated = image.format in _ANIMATION_FORMATS and getattr(image, "n_frames", 1) > 1
            # JPEG only: libjpeg scales by 1/2..1/8 while decoding, to no less than the request.
            image.draft("RGB", _fit(image.size, _WORK_SIDE))
            orientation = image.getexif().get(ExifTags.Base.Orientation)
            # Shrunk before anything else: a full-size copy (transposed, converted) of a large
            # image took three to six times its decoded size.
            working = _shrunk(image)
            if orientation in _UPRIGHT:
                working = working.transpose(_UPRIGHT[orientation])
            if orientation in _QUARTER_TURNS:
                width, height = height, width
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning is only raised when warnings are turned into errors.
        raise PermanentAnalyzerError(str(exc), reason="IMAGE_TOO_LARGE") from exc
    except MemoryError as exc:
        raise PermanentAnalyzerError("image too large to decode", reason="IMAGE_TOO_LARGE") from exc
    except Exception as exc:
        # Pillow's decoders raise many types (OSError, SyntaxError, ValueError, struct.error...).
        logger.debug("undecodable image", exc_info=True)
        raise PermanentAnalyzerError(
            f"image cannot be decoded: {exc}", reason="IMAGE_UNDECODABLE"
        ) from exc
    alpha: FloatArray | None = None
    if working.mode == "RGBA":
        alpha = np.asarray(working.getchannel("A"), dtype=np.float64) / 255.0
        background = Image.new("RGBA", working.size, (128, 128, 128, 255))
        working = Image.alpha_composite(background, working)
    return _Decoded(working.convert("RGB"), alpha, width, height, animated)


def _shrunk(image: Image.Image) -> Image.Image:
    """``image`` in RGB or RGBA, at most ``_WORK_SIDE`` on the long side, with no full-size copy
    (``image`` itself may be shrunk in place)."""
    if image.mode in _RESAMPLED_MODES and "transparency" not in image.info:
        image.thumbnail((_WORK_SIDE, _WORK_SIDE))
        return to_rgb_or_rgba(image)
    # Palettes and bilevel images are resampled by nearest neighbour, a transparent colour is
    # lost, other modes convert nonlinearly, and alpha is averaged premultiplied: these are
    # converted before they are averaged, a strip at a time.
    width, height = image.size
    factor = max(1, max(width, height) // (_REDUCING_GAP * _WORK_SIDE))
    rows = factor * max(1, _STRIP_PIXELS // (width * factor))
    strips = (
        to_rgb_or_rgba(image.crop((0, top, width, min(height, top + rows)))).reduce(factor)
        for top in range(0, height, rows)
    )
    first = next(strips)
    reduced = Image.new(first.mode, (-(-width // factor), -(-height // factor)))
    reduced.paste(first)
    for index, strip in enumerate(strips, start=1):
        reduced.paste(strip, (0, index * rows // factor))
    reduced.thumbnail((_WORK_SIDE, _WORK_SIDE))
    return reduced


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    """``size`` scaled down to at most ``side`` on the long side, keeping the aspect ratio."""
    scale = min(1.0, side / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _tags(decoded: _Decoded) -> tuple[str, ...]:
    rgb = np.asarray(decoded.rgb)
    tags: list[str] = []
    if decoded.animated:
        tags.append("animated")
    visible = np.ones(rgb.shape[:2], dtype=bool)
    if decoded.alpha is not None:
        if bool((decoded.alpha < 1.0).any()):
            tags.append("transparent")
        visible = decoded.alpha >= 0.5
    pixels = rgb[visible]
    if len(pixels):
        # Channel planes (3 x N) keep the per-pixel arithmetic on contiguous memory.
        planes = np.ascontiguousarray(pixels.T) / 255.0
        tags.extend(f"dominant-{name}" for name in _dominant_colours(planes))
        tags.append(f"colorfulness-{_colourfulness_class(planes)}")
        tags.append(f"brightness-{_brightness_class(pixels)}")
    sharpness = _sharpness_class(np.asarray(decoded.rgb.convert("L"), dtype=np.float64))
    if sharpness is not None:
        tags.append(f"sharpness-{sharpness}")
    tags.append(f"orientation-{_orientation(decoded.width, decoded.height)}")
    tags.append(f"size-{_size_class(decoded.width * decoded.height)}")
    return tuple(tags)


def _dominant_colours(planes: FloatArray) -> list[str]:
    """Named colours of ``planes`` (3 x N, 0..1) by share: the top one, then those above a share."""
    names = colour_names(planes)
    counts = np.bincount(names, minlength=len(COLOUR_NAMES))
    # A stable sort keeps ties in palette order, so the result is deterministic.
    ranked = np.argsort(-counts, kind="stable")
    shares = counts / counts.sum()
    chosen = [COLOUR_NAMES[ranked[0]]]
    for index in ranked[1:_MAX_DOMINANT_COLOURS]:
        if shares[index] >= _SECONDARY_COLOUR_SHARE:
            chosen.append(COLOUR_NAMES[index])
    return chosen


def _colourfulness_class(planes: FloatArray) -> str:
    """Hasler & Süsstrunk (2003), on 0..255 samples."""
    red, green, blue = planes * 255.0
    red_green = red - green
    yellow_blue = 0.5 * (red + green) - blue
    spread = np.hypot(red_green.std(), yellow_blue.std())
    offset = np.hypot(red_green.mean(), yellow_blue.mean())
    metric = float(spread + 0.3 * offset)
    return next((name for bound, name in _COLOURFULNESS_CLASSES if metric < bound), "vivid")


def _brightness_class(pixels: ByteArray) -> str:
    # Perceptual lightness: by luma of the encoded values, a saturated red or blue would be "dark".
    lightness = float(srgb_lightness(pixels).mean())
    if lightness < _DARK_LIGHTNESS:
        return "dark"
    return "bright" if lightness > _BRIGHT_LIGHTNESS else "medium"


def _sharpness_class(gray: FloatArray) -> str | None:
    """Variance of the 4-neighbour Laplacian of ``gray`` (0..255); None for flat images."""
    if min(gray.shape) < 3 or gray.std() < _FLAT_GRAY_STD:
        return None
    laplacian = (
        gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:] - 4.0 * gray[1:-1, 1:-1]
    )
    return "sharp" if laplacian.var() >= _SHARP_LAPLACIAN_VARIANCE else "blurry"


def _orientation(width: int, height: int) -> str:
    if max(width, height) <= _SQUARE_TOLERANCE * min(width, height):
        return "square"
    return "landscape" if width > height else "portrait"


def _size_class(pixel_count: int) -> str:
    megapixels = pixel_count / 1e6
    return next((name for bound, name in _SIZE_CLASSES if megapixels < bound), "very-large")
