"""The colour palette both analysers name colours with, and sRGB to CIE Lab conversions.

One palette, so ``dominant-<colour>`` means the same whichever analyser tagged an image.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
ByteArray = npt.NDArray[np.uint8]

COLOUR_NAMES = (
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
_COLOUR_INDEX = {name: index for index, name in enumerate(COLOUR_NAMES)}
# Hue ranges (degrees) of the chromatic names: red is [0, 15) and [345, 360), orange [15, 40)...
_HUE_UPPER_BOUNDS = np.array([15.0, 40.0, 70.0, 165.0, 195.0, 260.0, 315.0, 345.0])
_HUE_NAMES = np.array(
    [
        _COLOUR_INDEX[name]
        for name in ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "red")
    ],
    dtype=np.intp,
)

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


def colour_names(planes: FloatArray) -> npt.NDArray[np.intp]:
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


def srgb_lightness(srgb: ByteArray) -> FloatArray:
    """CIE L* (D65) of 8-bit sRGB samples, over the last axis."""
    luminance = _SRGB_TO_LINEAR[srgb] @ _SRGB_TO_XYZ[1]
    return np.asarray(116.0 * _cie_lab_f(luminance) - 16.0, dtype=np.float64)


def srgb_to_lab(srgb: ByteArray) -> FloatArray:
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
