"""Stain normalisation and colour / stain jitter as DALI operations, on either device.

Each follows scikit-image's definitions, which tests/test_stain.py checks the graph against on real cells:
- the haematoxylin, eosin and DAB stains of ``rgb2hed`` (Ruifrok and Johnston's matrix, optical density scaled
  by -log(1e-6)), jittered as Tellez et al. 2018 do: each stain scaled and shifted, then ``hed2rgb``;
- CIELAB of ``rgb2lab`` / ``lab2rgb`` (sRGB, D65, 2 degrees), in which Reinhard normalisation moves a cell's
  foreground mean and standard deviation per channel to those of a reference cell.
DALI has no Lab or HED conversion: each matrix is one ``coord_transform`` and the rest is element-wise math.
The two-sided steps (the sRGB gamma, the Lab cube root) compute both sides on inputs clamped into their own
side and select by mask, so the unused side cannot produce a NaN that the selection would carry.
Colour jitter is DALI's ``color_twist`` (hue turned in YIQ, saturation, brightness, contrast).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
import numpy as np
from skimage.color import colorconv, rgb2lab
from skimage.color import hed_from_rgb

from ..errors import DataError
from .augment import OD_SCALE

WHITE = colorconv.xyz_tristimulus_values(illuminant="D65", observer="2")
LAB_FROM_F = np.array([[0, 116, 0], [500, -500, 0], [0, 200, -200]], dtype=float)  # (fx, fy, fz) -> L, a, b
LAB_OFFSET = np.array([-16.0, 0, 0])
STD_FLOOR = 1e-3  # a cell of one flat colour has no spread to scale; it is moved, not blown up


@dataclass(frozen=True)
class LabTarget:
    """Mean and standard deviation of L, a and b of the reference image (over its region), and its content."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    region: str  # image: over every pixel; cell: over the HSV mask's foreground
    sha256: str  # of the reference image's file


def _linear(x, matrix: np.ndarray, offset: np.ndarray | None = None):
    """matrix @ pixel (+ offset) for every pixel of an HWC node, in float32."""
    offset = np.zeros(3) if offset is None else offset
    return fn.coord_transform(x, M=np.asarray(matrix, np.float32).ravel().tolist(),
                              T=np.asarray(offset, np.float32).tolist())


def _select(above, when_above, otherwise):
    return above * when_above + (1.0 - above) * otherwise


def rgb_to_lab(rgb):
    """CIELAB of float RGB in [0, 1] (HWC), as ``skimage.color.rgb2lab``."""
    linear = _select(rgb > 0.04045, dmath.pow((dmath.max(rgb, 0.04045) + 0.055) / 1.055, 2.4), rgb / 12.92)
    xyz = _linear(linear, colorconv.xyz_from_rgb / WHITE[:, None])  # already divided by the white point
    f = _select(xyz > 0.008856, dmath.cbrt(dmath.max(xyz, 0.008856)), 7.787 * xyz + 16.0 / 116.0)
    return _linear(f, LAB_FROM_F, LAB_OFFSET)


def lab_to_rgb(lab):
    """Float RGB in [0, 1] of CIELAB (HWC), as ``skimage.color.lab2rgb`` (which also clips z at 0)."""
    f = _linear(lab, np.linalg.inv(LAB_FROM_F), -np.linalg.inv(LAB_FROM_F) @ LAB_OFFSET)  # fx, fy, fz
    f = fn.cat(f[:, :, 0:2], dmath.max(f[:, :, 2:3], 0.0), axis=2)  # z clipped at 0
    xyz = _select(f > 0.2068966, dmath.pow(dmath.max(f, 0.2068966), 3.0), (f - 16.0 / 116.0) / 7.787)
    linear = _linear(xyz, colorconv.rgb_from_xyz * WHITE[None, :])
    rgb = _select(linear > 0.0031308, 1.055 * dmath.pow(dmath.max(linear, 0.0031308), 1 / 2.4) - 0.055,
                  linear * 12.92)
    return dmath.clamp(rgb, 0.0, 1.0)


def _to_uint8(x255):
    return fn.cast(dmath.clamp(x255 + 0.5, 0.0, 255.0), dtype=types.UINT8)  # rounded, as an image file holds it


def reinhard(rgb, mask, target: LabTarget):
    """Reinhard normalisation of an HWC uint8 image: the Lab mean and std per channel of its pixels in ``mask``
    (HxWx1) moved to the target's, for every pixel. Returns uint8 RGB."""
    lab = rgb_to_lab(rgb / 255.0)
    area = dmath.max(fn.reductions.sum(fn.cast(mask, dtype=types.FLOAT), axes=[0, 1]), 1.0)
    mean = fn.reductions.sum(lab * mask, axes=[0, 1]) / area
    centred = lab - mean
    std = dmath.sqrt(fn.reductions.sum(centred * centred * mask, axes=[0, 1]) / area)
    moved = _linear(centred / dmath.max(std, STD_FLOOR), np.diag(target.std), np.asarray(target.mean))
    return _to_uint8(lab_to_rgb(moved) * 255.0)


def stain_jitter(rgb, matrices, shifts):
    """HED jitter of an HWC uint8 cell: ``matrices`` and ``shifts`` are per-sample nodes of
    ``augment.stain_transforms``.
    Returns uint8 RGB."""
    density = dmath.log(dmath.max(rgb / 255.0, 1e-6)) / -OD_SCALE
    stains = dmath.max(_linear(density, hed_from_rgb.T), 0.0)
    log_rgb = fn.coord_transform(stains, M=matrices, T=shifts)
    return _to_uint8(dmath.clamp(dmath.exp(log_rgb), 0.0, 1.0) * 255.0)


def colour_jitter(rgb, factors):
    """DALI's color_twist with per-sample hue (degrees), saturation, brightness and contrast nodes."""
    hue, saturation, brightness, contrast = factors
    return fn.color_twist(rgb, hue=hue, saturation=saturation, brightness=brightness, contrast=contrast)


def lab_target(rgb: np.ndarray, mask: np.ndarray, region: str, reference: Path, sha256: str,
               min_foreground: float) -> LabTarget:
    """The reference's Lab statistics over the region; refused when the mask keeps too little of it to stand for
    a stained cell."""
    share = float(mask.mean())
    if share < min_foreground:
        raise DataError(f"stain_norm.reference {reference}: the HSV mask keeps {share:.1%} of it as cell, under "
                        f"stain_norm.min_foreground = {min_foreground:.0%}; it is mostly background: choose an image "
                        "of one well-stained cell")
    pixels = rgb[mask.astype(bool)] if region == "cell" else rgb.reshape(-1, 3)
    lab = rgb2lab(pixels.reshape(-1, 1, 3) / 255.0).reshape(-1, 3)
    return LabTarget(tuple(map(float, lab.mean(0))), tuple(map(float, lab.std(0))), region, sha256)
