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

The embedding concatenates four L2-normalised, centred feature blocks computed on fixed-size
resamples of the working image (at most 256 px on the long side): a soft-binned Lab colour
histogram, an 8x8 Lab colour layout, the low-frequency 8x8 DCT block of a 32x32 grayscale (pHash
without the sign), and a 4x4-cell gradient-orientation histogram. The concatenation is mapped to
the configured dimension by a fixed orthonormal projection generated from a fixed seed (which
keeps cosine similarities unchanged whenever the dimension is at least the feature count), and
L2-normalised.
"""

from __future__ import annotations

import asyncio
import functools
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
import numpy.typing as npt
from PIL import Image, ImageOps

from analysis_service.analyzers.base import AnalysisInput, AnalysisOutput, ApiLimit, RateLimiter
from analysis_service.errors import PermanentAnalyzerError, TransientAnalyzerError

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
ByteArray = npt.NDArray[np.uint8]

_WORK_SIDE = 256
_ANIMATION_FORMATS = frozenset({"GIF", "PNG", "WEBP", "FLI", "AVIF"})
_PROJECTION_SEED = 0x6D656469  # fixed: changing it changes every embedding (bump the version)
# Analysis processes yield the CPU to the service's own process: serving RPCs and watch
# streams is what callers wait on; analysis is background work that takes what is left
# (idle scheduling class where there is one, else this niceness).
_PROCESS_NICENESS = 10
# Thread pools of the numeric libraries, held to one thread in the analysis processes: there
# is one process per CPU already, and OpenBLAS's threads busy-wait. Two processes with two
# threads each on two cores took three minutes over the embedding's first QR decomposition
# (0.2 s alone). The libraries read these when they load, so the children must inherit them.
_LIBRARY_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

_COLOUR_NAMES = (
    "red",
    "orange",
    "yellow",
    "green",
    "teal",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
)
_COLOUR_INDEX = {name: index for index, name in enumerate(_COLOUR_NAMES)}
# Hue ranges (degrees) of the chromatic names: red is [0, 15) and [345, 360), orange [15, 40)...
_HUE_UPPER_BOUNDS = np.array([15.0, 40.0, 70.0, 165.0, 195.0, 260.0, 315.0, 345.0])
_HUE_NAMES = np.array(
    [
        _COLOUR_INDEX[name]
        for name in ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "red")
    ],
    dtype=np.intp,
)
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

_SRGB_LEVELS = np.arange(256) / 255.0
_SRGB_TO_LINEAR = np.where(
    _SRGB_LEVELS <= 0.04045, _SRGB_LEVELS / 12.92, ((_SRGB_LEVELS + 0.055) / 1.055) ** 2.4
)
_SRGB_TO_XYZ = np.array(
    [
        [0.4124, 0.3576, 0.1805],
        [0.2126, 0.7152, 0.0722],
        [0.0193, 0.1192, 0.9505],
    ]
)
# Photographs' DCT amplitudes fall off as 1/frequency; without this whitening the first few
# coefficients (e.g. a horizon) would make most images look alike.
_DCT_WHITENING = np.hypot(*np.indices((8, 8))).ravel()[1:]
# Relative weights of the embedding's blocks: colour, layout, structure (DCT), texture (gradients).
_BLOCK_WEIGHTS = (1.0, 1.0, 1.0, 0.8)


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
        self._pool: ProcessPoolExecutor | None = None

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
        pool = self._pool
        if pool is None:
            for variable in _LIBRARY_THREAD_VARIABLES:
                os.environ.setdefault(variable, "1")
            pool = self._pool = ProcessPoolExecutor(
                self._processes,
                # Not fork: the service's process runs gRPC's and the database's threads.
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_child,
                initargs=(os.getpid(),),
            )
        try:
            return await asyncio.get_running_loop().run_in_executor(
                pool, _analyze_bytes, item.content, self._dimensions
            )
        except BrokenProcessPool as exc:
            # A child died (killed, out of memory): the next call starts a new pool.
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise TransientAnalyzerError(f"an analysis process died: {exc}") from exc

    async def aclose(self) -> None:
        """Stop the analysis processes."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


def _start_child(parent_pid: int) -> None:
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


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _analyze_bytes(content: bytes, dimensions: int) -> AnalysisOutput:
    decoded = _decode(content)
    return AnalysisOutput(_tags(decoded), _embedding(decoded.rgb, dimensions))


def _decode(content: bytes) -> _Decoded:
    """Decode to the working size as cheaply as the format allows; every failure is permanent."""
    try:
        with Image.open(io.BytesIO(content)) as image:
            width, height = image.size
            animated = image.format in _ANIMATION_FORMATS and getattr(image, "n_frames", 1) > 1
            stored_size = _fit(image.size, _WORK_SIDE)
            # JPEG only: libjpeg scales by 1/2..1/8 while decoding, to no less than the request.
            image.draft("RGB", stored_size)
            oriented = ImageOps.exif_transpose(image)
            if oriented.size != image.size:
                width, height = height, width
            working = _to_rgb_or_rgba(oriented)
            working.thumbnail((_WORK_SIDE, _WORK_SIDE))
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


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    """``size`` scaled down to at most ``side`` on the long side, keeping the aspect ratio."""
    scale = min(1.0, side / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16"):
        # Pillow's conversion clips 16-bit samples to 255 instead of scaling them.
        samples = np.asarray(image).astype(np.uint32) >> 8
        return Image.fromarray(samples.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        # 32-bit integer images are taken as 16-bit data, float images as 0..1.
        full_scale = 65535.0 if image.mode == "I" else 1.0
        samples = np.clip(np.asarray(image, dtype=np.float64) / full_scale, 0.0, 1.0)
        return Image.fromarray(np.round(samples * 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB")


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
    names = _colour_names(planes)
    counts = np.bincount(names, minlength=len(_COLOUR_NAMES))
    # A stable sort keeps ties in palette order, so the result is deterministic.
    ranked = np.argsort(-counts, kind="stable")
    shares = counts / counts.sum()
    chosen = [_COLOUR_NAMES[ranked[0]]]
    for index in ranked[1:_MAX_DOMINANT_COLOURS]:
        if shares[index] >= _SECONDARY_COLOUR_SHARE:
            chosen.append(_COLOUR_NAMES[index])
    return chosen


def _colour_names(planes: FloatArray) -> npt.NDArray[np.intp]:
    """The palette index of each pixel, from hue with rules for achromatic, brown and pink."""
    red, green, blue = planes
    value = np.maximum(np.maximum(red, green), blue)
    chroma = value - np.minimum(np.minimum(red, green), blue)
    saturation = np.divide(chroma, value, out=np.zeros_like(value), where=value > 0)
    safe_chroma = np.where(chroma > 0, chroma, 1.0)
    sector = np.where(
        value == red,
        ((green - blue) / safe_chroma) % 6.0,
        np.where(
            value == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0
        ),
    )
    hue = sector * 60.0 % 360.0
    names = np.array(_HUE_NAMES[np.searchsorted(_HUE_UPPER_BOUNDS, hue, side="right")], np.intp)
    warm = (hue >= 10.0) & (hue < 50.0)
    names[warm & ((value < 0.65) | (saturation < 0.45))] = _COLOUR_INDEX["brown"]
    light_red = ((hue < 15.0) | (hue >= 345.0)) & (saturation < 0.5) & (value > 0.7)
    names[light_red] = _COLOUR_INDEX["pink"]
    achromatic = chroma < 0.1
    names[achromatic] = _COLOUR_INDEX["gray"]
    names[achromatic & (value > 0.85)] = _COLOUR_INDEX["white"]
    names[value < 0.18] = _COLOUR_INDEX["black"]
    return names


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
    luminance = _SRGB_TO_LINEAR[pixels] @ _SRGB_TO_XYZ[1]
    lightness = float((116.0 * _cie_lab_f(luminance) - 16.0).mean())
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


def _embedding(rgb: Image.Image, dimensions: int) -> npt.NDArray[np.float32]:
    blocks = (
        _colour_histogram(rgb),
        _colour_layout(rgb),
        _low_frequency_structure(rgb),
        _gradient_histogram(rgb),
    )
    features = np.concatenate(
        [weight * _unit(block) for weight, block in zip(_BLOCK_WEIGHTS, blocks, strict=True)]
    )
    projected = _projection(dimensions, len(features)) @ _unit(features)
    return _unit(projected).astype(np.float32)


def _colour_histogram(rgb: Image.Image) -> FloatArray:
    """Lab histogram, 4x6x6 bins, each pixel split linearly between neighbouring bins."""
    lab = _lab(np.asarray(rgb.resize((64, 64), Image.Resampling.BOX))).reshape(-1, 3)
    bins = np.array([4, 6, 6])
    low, high = np.array([0.0, -60.0, -60.0]), np.array([100.0, 60.0, 60.0])
    # Bin centres sit at integer coordinates 0..n-1.
    coords = np.clip((lab - low) / (high - low) * bins - 0.5, 0.0, bins - 1.0)
    base = np.minimum(np.floor(coords).astype(np.intp), bins - 2)
    frac = coords - base
    histogram = np.zeros(int(bins.prod()))
    for corner in np.ndindex(2, 2, 2):
        offset = np.array(corner)
        weight = np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=1)
        index = np.ravel_multi_index(tuple((base + offset).T), tuple(bins))
        histogram += np.bincount(index, weights=weight, minlength=histogram.size)
    # The square root keeps one large uniform area from outweighing everything else.
    root = np.sqrt(histogram / histogram.sum())
    return np.asarray(root - root.mean(), dtype=np.float64)


def _colour_layout(rgb: Image.Image) -> FloatArray:
    """Mean Lab colour of each cell of an 8x8 grid, centred on mid-gray."""
    lab = _lab(np.asarray(rgb.resize((8, 8), Image.Resampling.BOX)))
    centred = (lab - np.array([50.0, 0.0, 0.0])) / np.array([50.0, 40.0, 40.0])
    return np.asarray(centred.ravel(), dtype=np.float64)


@functools.cache
def _dct_matrix(size: int) -> FloatArray:
    k = np.arange(size)[:, None]
    n = np.arange(size)[None, :]
    matrix = np.sqrt(2.0 / size) * np.cos(np.pi * (2 * n + 1) * k / (2 * size))
    matrix[0] /= np.sqrt(2.0)
    matrix.setflags(write=False)
    return np.asarray(matrix, dtype=np.float64)


def _low_frequency_structure(rgb: Image.Image) -> FloatArray:
    """The 8x8 low-frequency DCT coefficients of a 32x32 grayscale, without the mean (DC)."""
    gray = np.asarray(rgb.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    dct = _dct_matrix(32)
    coefficients = (dct @ gray @ dct.T)[:8, :8].ravel()
    return np.asarray(coefficients[1:] * _DCT_WHITENING, dtype=np.float64)


def _gradient_histogram(rgb: Image.Image) -> FloatArray:
    """Unsigned gradient orientations (9 bins, magnitude-weighted) in each cell of a 4x4 grid."""
    gray = np.asarray(rgb.convert("L").resize((64, 64), Image.Resampling.BOX), dtype=np.float64)
    gx = np.zeros_like(gray)
    gy = np.zeros_like(gray)
    gx[:, 1:-1] = gray[:, 2:] - gray[:, :-2]
    gy[1:-1, :] = gray[2:, :] - gray[:-2, :]
    magnitude = np.hypot(gx, gy)
    bins = 9
    position = (np.arctan2(gy, gx) % np.pi) / np.pi * bins - 0.5
    lower = np.floor(position)
    frac = position - lower
    cell = (np.arange(64) // 16)[:, None] * 4 + (np.arange(64) // 16)[None, :]
    histogram = np.zeros(16 * bins)
    for shift, weight in ((0, 1.0 - frac), (1, frac)):
        index = cell * bins + ((lower.astype(np.intp) + shift) % bins)
        histogram += np.bincount(
            index.ravel(), weights=(magnitude * weight).ravel(), minlength=histogram.size
        )
    root = np.sqrt(histogram)
    return np.asarray(root - root.mean(), dtype=np.float64)


def _lab(srgb: ByteArray) -> FloatArray:
    """CIE Lab (D65) of 8-bit sRGB samples, over the last axis."""
    xyz = _SRGB_TO_LINEAR[srgb] @ _SRGB_TO_XYZ.T / np.array([0.95047, 1.0, 1.08883])
    f = _cie_lab_f(xyz)
    lightness = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([lightness, a, b], axis=-1)


def _cie_lab_f(t: FloatArray) -> FloatArray:
    epsilon = 216.0 / 24389.0
    return np.where(t > epsilon, np.cbrt(t), (24389.0 / 27.0 * t + 16.0) / 116.0)


@functools.lru_cache(maxsize=8)
def _projection(dimensions: int, feature_count: int) -> FloatArray:
    """A fixed matrix with orthonormal columns (or rows, when reducing) from a fixed seed."""
    rng = np.random.default_rng(_PROJECTION_SEED)
    gaussian = rng.standard_normal((max(dimensions, feature_count), min(dimensions, feature_count)))
    orthonormal, _ = np.linalg.qr(gaussian)
    matrix = orthonormal if dimensions >= feature_count else orthonormal.T
    matrix.setflags(write=False)
    return matrix


def _unit(vector: FloatArray) -> FloatArray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
