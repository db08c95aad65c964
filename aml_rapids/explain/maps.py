"""Numbers that check a saliency map instead of eyes: the pointing test (how much of a map's energy lies on the
cell's HSV foreground, against the foreground's share of the image) and the rank correlation of two maps of the
same cells (the model-randomisation test; occlusion against Grad-CAM)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.stats import ConstantInputWarning, spearmanr


def pointing(maps: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per cell: the share of the map's (non-negative) energy inside the mask, the mask's share of the image,
    and their ratio (1: no better than a map spread evenly; NaN: a map that is zero everywhere)."""
    energy = np.clip(maps.astype(np.float64), 0, None)
    total = energy.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        inside = np.where(total > 0, (energy * masks).sum(axis=(1, 2)) / total, np.nan)
        share = masks.mean(axis=(1, 2))
        return {"energy_in_mask": inside, "mask_share": share, "pointing_ratio": inside / share}


def pooled(maps: np.ndarray, cell: int) -> np.ndarray:
    """``maps`` averaged over ``cell`` x ``cell`` squares (occlusion's stride), for comparing at its resolution."""
    tensor = torch.as_tensor(np.asarray(maps, dtype=np.float32))[:, None]
    return torch.nn.functional.avg_pool2d(tensor, cell, cell, ceil_mode=True)[:, 0].numpy()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho of each pair of maps (NaN where one of them is constant)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return np.array([spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b)], dtype=np.float64)


def mean_or_none(values: np.ndarray) -> float | None:
    """The mean of the finite values, None if there are none (JSON has no NaN)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return round(float(finite.mean()), 4) if len(finite) else None
