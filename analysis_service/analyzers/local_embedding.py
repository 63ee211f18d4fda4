"""The ``local`` analyser's embedding: measured on the working image, no network.

The embedding concatenates four L2-normalised, centred feature blocks computed on fixed-size
resamples of the working image (at most 256 px on the long side): a soft-binned Lab colour
histogram, an 8x8 Lab colour layout, the low-frequency 8x8 DCT block of a 32x32 grayscale (pHash
without the sign), and a 4x4-cell gradient-orientation histogram. The concatenation is mapped to
the configured dimension by a fixed orthonormal projection generated from a fixed seed (which
keeps cosine similarities unchanged whenever the dimension is at least the feature count), and
L2-normalised.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt
from PIL import Image

from analysis_service.analyzers.colours import FloatArray, srgb_to_lab

_PROJECTION_SEED = 0x6D656469  # fixed: changing it changes every embedding (bump the version)
# Photographs' DCT amplitudes fall off as 1/frequency; without this whitening the first few
# coefficients (e.g. a horizon) would make most images look alike.
_DCT_WHITENING = np.hypot(*np.indices((8, 8))).ravel()[1:]
# Relative weights of the embedding's blocks: colour, layout, structure (DCT), texture (gradients).
_BLOCK_WEIGHTS = (1.0, 1.0, 1.0, 0.8)


def embedding(rgb: Image.Image, dimensions: int) -> npt.NDArray[np.float32]:
    """The unit-length embedding of ``rgb`` (the working image) in ``dimensions`` dimensions."""
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
    lab = srgb_to_lab(np.asarray(rgb.resize((64, 64), Image.Resampling.BOX))).reshape(-1, 3)
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
    lab = srgb_to_lab(np.asarray(rgb.resize((8, 8), Image.Resampling.BOX)))
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
