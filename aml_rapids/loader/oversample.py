"""Oversampling of the training split, as the published method does it, with an augmentation index per copy."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import DataError


def oversample(table: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Bring every class to the size of the largest: whole replications plus a seeded sample without
    replacement for the remainder. Copy k of a row has ``aug_index`` k (originals 0), so no image appears more
    than ceil(max / n_class) times and every copy's features are told apart."""
    if table.empty:
        return table.assign(aug_index=pd.Series(dtype="int64"))
    rng = np.random.default_rng(seed)
    largest = int(table["label"].value_counts().max())
    parts = []
    for label in sorted(table["label"].unique()):
        rows = table[table["label"] == label]
        whole, remainder = divmod(largest, len(rows))
        parts += [rows.assign(aug_index=k) for k in range(whole)]
        if remainder:
            picked = rng.choice(len(rows), size=remainder, replace=False)
            parts.append(rows.iloc[np.sort(picked)].assign(aug_index=whole))
    return pd.concat(parts).reset_index(drop=True)


def loader_table(table: pd.DataFrame, split: str | None, oversample_enabled: bool, seed: int) -> pd.DataFrame:
    """The rows one loader pass reads: one split (or all rows), oversampled only for ``train``."""
    if split is not None:
        if "split" not in table.columns:
            raise DataError("the manifest has no split column; run `aml-rapids split` first")
        table = table[table["split"] == split]
    if split == "train" and oversample_enabled:
        return oversample(table, seed)
    return table.assign(aug_index=0).reset_index(drop=True)
