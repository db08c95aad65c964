"""HSV background mask built from DALI arithmetic (DALI has no HSV conversion operator).

Hue, saturation and value follow the standard hexcone definition (as OpenCV's float conversion), but no hue is
ever computed: every pixel of one hue lies on a half-plane through the grey axis of RGB space, so a hue range of
at most 180 degrees is the intersection of two linear tests on R, G, B (a wider one their union), and
S >= s_min is min(R,G,B) <= (1 - s_min) * max(R,G,B). On a CPU each DALI arithmetic node is a pass over the image
(about 1 ns per pixel on the reference machine), so the graph is built with as few nodes as that allows
(see docs/segmentation.md).
"""

from __future__ import annotations

import colorsys

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import numpy as np

from ..config import SegmentationConfig


def hue_normal(hue_deg: float) -> np.ndarray:
    """Normal of the plane through the grey axis and the pure colour of this hue, positive towards larger hue."""
    pure = np.array(colorsys.hsv_to_rgb((hue_deg % 360) / 360.0, 1.0, 1.0))
    return np.cross(np.ones(3), pure)


def _non_negative(channels, normal: np.ndarray):
    """normal . (R, G, B) >= 0, written as 'a * one channel + b * another >= (or <=) the third' (fewest nodes)."""
    k = int(np.argmax(np.abs(normal)))
    a, b = (j for j in range(3) if j != k)
    coef = -normal / normal[k]
    rest = coef[a] * channels[a] + coef[b] * channels[b]
    return rest >= channels[k] if normal[k] < 0 else rest <= channels[k]


def hue_span(cfg: SegmentationConfig) -> float:
    """Width of the kept hue range in degrees; hue_min > hue_max is a range through 0 (e.g. 330 to 30)."""
    return cfg.hue_max - cfg.hue_min + (360.0 if cfg.hue_max < cfg.hue_min else 0.0)


def _channels(rgb):
    """R, G and B as three HxW nodes. On a CPU: one transpose to planes, then a contiguous copy of each
    (indexing the HWC image channel by channel, a strided copy each, made the masked loader about 10% slower
    there); on a GPU: the channel slices, as measured and tested there (docs/loader.md)."""
    if rgb.device == "gpu":
        return [rgb[:, :, c] for c in range(3)]
    planes = fn.reshape(fn.transpose(rgb, perm=[2, 0, 1]), layout="FHW")
    return list(fn.element_extract(planes, element_map=[0, 1, 2]))


def hsv_mask(rgb, cfg: SegmentationConfig):
    """A boolean HxWx1 mask (True = cell) from an HWC uint8 RGB DataNode, on whatever device the node lives on."""
    channels = _channels(rgb)
    value = dmath.max(dmath.max(channels[0], channels[1]), channels[2])
    low = dmath.min(dmath.min(channels[0], channels[1]), channels[2])
    keep = (low <= (1.0 - cfg.saturation_min) * value) & (value > low)  # saturation; grey pixels have no hue
    span = hue_span(cfg)
    if span < 360:
        above = _non_negative(channels, hue_normal(cfg.hue_min))
        below = _non_negative(channels, -hue_normal(cfg.hue_max))
        keep = keep & ((above & below) if span <= 180 else (above | below))
    if cfg.value_min > 0:
        keep = keep & (value >= 255.0 * cfg.value_min)
    if cfg.value_max < 1:
        keep = keep & (value <= 255.0 * cfg.value_max)
    return fn.expand_dims(keep, axes=[2], new_axis_names="C")
