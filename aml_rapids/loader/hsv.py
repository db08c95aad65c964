"""HSV background mask built from DALI arithmetic (DALI has no HSV conversion operator).

Hue, saturation and value follow the standard hexcone definition (as OpenCV's float conversion):
V = max(R,G,B), S = (V - min) / V, H = 60 * sector offset, in degrees [0, 360).
"""

from __future__ import annotations

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types

from ..config import SegmentationConfig


def _f(node):
    return fn.cast(node, dtype=types.FLOAT)


def hsv_mask(rgb, cfg: SegmentationConfig):
    """A uint8 HxWx1 mask (1 = cell) from an HWC uint8 RGB DataNode, on whatever device the node lives on."""
    image = _f(rgb) / 255.0
    r, g, b = image[:, :, 0], image[:, :, 1], image[:, :, 2]
    value = dmath.max(dmath.max(r, g), b)
    low = dmath.min(dmath.min(r, g), b)
    delta = value - low
    safe_delta = delta + _f(delta == 0.0)
    saturation = delta / (value + _f(value == 0.0))
    # Sector by which channel is the maximum, red winning ties, then green (as OpenCV).
    is_r = _f(value == r)
    is_g = _f(value == g) * (1.0 - is_r)
    is_b = (1.0 - is_r) * (1.0 - is_g)
    sector = is_r * ((g - b) / safe_delta) + is_g * (2.0 + (b - r) / safe_delta) + is_b * (4.0 + (r - g) / safe_delta)
    hue = 60.0 * (sector + 6.0 * _f(sector < 0.0))
    keep = ((hue >= cfg.hue_min) & (hue <= cfg.hue_max) & (saturation >= cfg.saturation_min)
            & (value >= cfg.value_min) & (value <= cfg.value_max) & (delta > 0.0))
    return fn.expand_dims(fn.cast(keep, dtype=types.UINT8), axes=[2], new_axis_names="C")
