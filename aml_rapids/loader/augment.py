"""Augmentation parameters drawn on the host, per row, from (seed, cell id, augmentation index) and, when
fine-tuning, the epoch: one affine matrix, and where asked colour factors and stain transforms.

Drawing them from the row's identity rather than from DALI's stream makes them independent of batch size,
row order, sharding and restarts: a resumed or re-sharded extraction augments every copy exactly as before, and
a resumed fine-tuning sees every epoch's augmentations as an uninterrupted one (each epoch new ones).
The draws are a keyed hash (splitmix64) of that identity, computed for all rows at once: a generator per row
cost 35 us a row, 2.9 s of a full-size epoch, which the GPU loader would otherwise wait for.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import AugmentConfig
from skimage.color import rgb_from_hed

DRAWS = "splitmix64-v1"  # recorded in the store: a store keeps the draws it was made with
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_EPOCH_KEY = np.uint64(0x5851F42D4C957F2D)  # keeps epoch 0's draws apart from the extraction's
# Columns of a row's draws: each kind its own, so turning one on leaves the others' draws as they were.
AFFINE, COLOUR, STAIN = slice(0, 7), slice(7, 11), slice(11, 17)


OD_SCALE = float(-np.log(1e-6))  # scikit-image's rgb2hed: optical density is -log(rgb) / OD_SCALE, rgb >= 1e-6


@dataclass
class RowDraws:
    """What the graph's augmentation reads per row, in the loader's row order: the warp's (rows, 2, 3) matrices;
    colour factors (rows, 4: hue degrees, saturation, brightness, contrast) or None; stain transforms
    ((rows, 3, 3), (rows, 3)) or None."""

    matrices: np.ndarray
    colour: np.ndarray | None = None
    stain: tuple[np.ndarray, np.ndarray] | None = None


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 arrays that scatters neighbouring keys (wraps by design)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_uniforms(seed: int, cell_ids, aug_index, count: int, epoch: int | None = None) -> np.ndarray:
    """(rows, count) uniforms in [0, 1), each a function of (seed, cell id, augmentation index, column) and the
    epoch, if given, only (without one: the draws stores are made with)."""
    crc = np.fromiter((zlib.crc32(str(c).encode()) for c in cell_ids), np.uint64, len(cell_ids))
    key = _mix((crc << np.uint64(32)) | np.asarray(aug_index, dtype=np.uint64)) ^ _mix(
        np.full(len(crc), seed % 2**64, dtype=np.uint64))
    if epoch is not None:
        key ^= _mix(_mix(np.full(len(crc), epoch, dtype=np.uint64) + _EPOCH_KEY))
    columns = key[:, None] + _GOLDEN * np.arange(1, count + 1, dtype=np.uint64)
    return (_mix(_mix(columns)) >> np.uint64(11)) * 2.0**-53


def augment_identity(cfg: AugmentConfig) -> dict:
    """The settings that decide augmented features, colour and stain jitter only when on: the form stores and
    studies made before they existed recorded."""
    return cfg.model_dump(exclude={name for name in ("colour", "stain") if not getattr(cfg, name).enabled})


def _uniforms(table: pd.DataFrame, seed: int, columns: slice, epoch: int | None) -> np.ndarray:
    aug = table["aug_index"].to_numpy() if "aug_index" in table.columns else np.zeros(len(table), np.int64)
    return row_uniforms(seed, table["cell_id"], aug, columns.stop, epoch)[:, columns]


def affine_matrices(table: pd.DataFrame, cfg: AugmentConfig, seed: int, out_size: int,
                    epoch: int | None = None) -> np.ndarray:
    """(rows, 2, 3) forward maps (input -> output pixel coordinates), for a loader table with cell_id, aug_index
    (default 0), width and height: flips, x/y scale and rotation about the centre, then the resize to
    ``out_size``, so the image is resampled once (a warp followed by a resize blurred the training copies and
    cost 5 points of test accuracy on PBC)."""
    u = _uniforms(table, seed, AFFINE, epoch)
    angle = np.where(u[:, 0] < cfg.p_rotate, np.deg2rad(cfg.rotate_deg * (2 * u[:, 1] - 1)), 0.0)
    scaled = u[:, 2] < cfg.p_scale
    span = cfg.scale_max - cfg.scale_min
    sx = np.where(scaled, cfg.scale_min + span * u[:, 3], 1.0) * np.where(u[:, 5] < cfg.p_hflip, -1.0, 1.0)
    sy = np.where(scaled, cfg.scale_min + span * u[:, 4], 1.0) * np.where(u[:, 6] < cfg.p_vflip, -1.0, 1.0)
    cos, sin = np.cos(angle), np.sin(angle)
    linear = np.stack([np.stack([cos * sx, -sin * sy], -1), np.stack([sin * sx, cos * sy], -1)], -2)  # R @ diag
    width, height = table["width"].to_numpy(float), table["height"].to_numpy(float)
    resize = np.stack([out_size / width, out_size / height], -1)[:, :, None]  # diag(out/w, out/h) @ ...
    center = np.stack([width, height], -1)[:, :, None] / 2.0
    shift = center - linear @ center
    return (resize * np.concatenate([linear, shift], axis=2)).astype(np.float32)


def colour_factors(table: pd.DataFrame, cfg: AugmentConfig, seed: int, epoch: int | None = None) -> np.ndarray:
    """(rows, 4) color_twist arguments: hue turned by up to +-hue_deg, the others 1 +- their configured spread."""
    c = cfg.colour
    signed = 2 * _uniforms(table, seed, COLOUR, epoch) - 1
    spread = np.array([c.hue_deg, c.saturation, c.brightness, c.contrast])
    return (np.array([0.0, 1.0, 1.0, 1.0]) + signed * spread).astype(np.float32)


def stain_draws(table: pd.DataFrame, cfg: AugmentConfig, seed: int,
                epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's HED jitter (stains scaled by 1 +- sigma, shifted by +- bias) as stain transforms."""
    signed = 2 * _uniforms(table, seed, STAIN, epoch) - 1
    return stain_transforms(1 + cfg.stain.sigma * signed[:, :3], cfg.stain.bias * signed[:, 3:])


def row_draws(table: pd.DataFrame, cfg: AugmentConfig, seed: int, out_size: int,
              epoch: int | None = None) -> RowDraws:
    """Every augmentation the config turns on, drawn for these rows."""
    return RowDraws(affine_matrices(table, cfg, seed, out_size, epoch),
                    colour_factors(table, cfg, seed, epoch) if cfg.colour.enabled else None,
                    stain_draws(table, cfg, seed, epoch) if cfg.stain.enabled else None)


def stain_transforms(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (3, 3) matrices and (3,) shifts taking stains to log RGB after scaling by ``alpha`` and shifting by
    ``beta`` (both (rows, 3)): hed2rgb's -OD_SCALE * (alpha * s + beta) @ rgb_from_hed, as M @ s + T."""
    to_log_rgb = -OD_SCALE * rgb_from_hed.T
    matrices = to_log_rgb[None] * alpha[:, None, :]
    shifts = beta @ to_log_rgb.T
    return matrices.astype(np.float32), shifts.astype(np.float32)
