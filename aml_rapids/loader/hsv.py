"""HSV background mask built from DALI arithmetic (DALI has no HSV conversion operator).

Hue, saturation and value follow the standard hexcone definition (as OpenCV's float conversion):
V = max(R,G,B), S = (V - min) / V, H = 60 * (sector offset + signed channel difference / (V - min)).
The thresholds are tested multiplied through by (V - min) and V, so the graph has no divisions and few
operators: each DALI arithmetic node is a pass over the image, and on a CPU the mask costs what its node count is.
"""

from __future__ import annotations

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath

from ..config import SegmentationConfig


def hsv_mask(rgb, cfg: SegmentationConfig):
    """A boolean HxWx1 mask (True = cell) from an HWC uint8 RGB DataNode, on whatever device the node lives on."""
    r, g, b = (rgb[:, :, c] * 1.0 for c in range(3))
    value = dmath.max(dmath.max(r, g), b)
    delta = value - dmath.min(dmath.min(r, g), b)
    # Sector by which channel is the maximum, red winning ties, then green (as OpenCV).
    is_r = value == r
    is_g = (value == g) & (value != r)
    is_b = (value != r) & (value != g)
    hue_times_delta = (is_r * (g - b + 6.0 * delta * (g < b)) + is_g * (b - r + 2.0 * delta)
                       + is_b * (r - g + 4.0 * delta))  # = hue / 60 * delta, hue in [0, 360)
    keep = ((hue_times_delta >= cfg.hue_min / 60.0 * delta) & (hue_times_delta <= cfg.hue_max / 60.0 * delta)
            & (delta >= cfg.saturation_min * value) & (delta > 0.0))
    if cfg.value_min > 0:
        keep = keep & (value >= 255.0 * cfg.value_min)
    if cfg.value_max < 1:
        keep = keep & (value <= 255.0 * cfg.value_max)
    return fn.expand_dims(keep, axes=[2], new_axis_names="C")
