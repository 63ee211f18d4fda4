"""Decoded images brought to the 8-bit modes both analysers work in.

Pillow's own ``convert`` clips 16-bit and 32-bit integer samples to 255 (a 16-bit image turns
almost white) and truncates float samples (a float image of 0..1 turns black): those modes are
scaled here instead.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_8_bit(image: Image.Image) -> Image.Image:
    """``image`` with 8-bit samples: high bit depth greyscale scaled to ``L``, others as they are.

    32-bit integer images are taken as 16-bit data, float images as 0..1.
    """
    if image.mode.startswith("I;16"):
        samples = np.asarray(image).astype(np.uint32) >> 8
        return Image.fromarray(samples.astype(np.uint8), mode="L")
    if image.mode in ("I", "F"):
        full_scale = 65535.0 if image.mode == "I" else 1.0
        scaled = np.clip(np.asarray(image, dtype=np.float64) / full_scale, 0.0, 1.0)
        return Image.fromarray(np.round(scaled * 255).astype(np.uint8), mode="L")
    return image


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` has an alpha channel or a transparent colour."""
    bands = image.getbands()
    return "A" in bands or "a" in bands or "transparency" in image.info


def to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    """``image`` as RGBA when it has transparency, else as RGB; see :func:`to_8_bit`."""
    eight_bit = to_8_bit(image)
    return eight_bit.convert("RGBA" if has_alpha(eight_bit) else "RGB")
