"""Patient scores pooled from cell scores, the baselines a learned patient model must beat: the mean of a bag's
cell probabilities (the method's patient-level call) and their quantiles (a high quantile: "some cells look like
it"). A quantile row is a score per class, not a distribution (it need not sum to 1): rescaling it would reorder
the patients, and its AUC would no longer be the quantile's."""

from __future__ import annotations

import numpy as np

from .bags import Bags


def pooling_name(how: str | float) -> str:
    return "mean of cell probabilities" if how == "mean" else f"quantile {how:g} of cell probabilities"


def pooled(bags: Bags, cell_proba: np.ndarray, how: str | float) -> np.ndarray:
    """(bags, classes): per bag, the mean (``"mean"``) or the ``how``-quantile of its cells' class probabilities."""
    parts = [cell_proba[bags.cells(i)] for i in range(len(bags))]
    return np.stack([p.mean(axis=0) if how == "mean" else np.quantile(p, how, axis=0) for p in parts])
