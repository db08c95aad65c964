"""Rows and features of a feature store, read chunk by chunk, checked before any estimator sees them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import AmlRapidsError
from ..features.plan import STATUS_OK
from ..features.store import FeatureStore


def load_rows(store: FeatureStore, backbones: list[str], splits: tuple[str, ...] | None) -> tuple[np.ndarray, pd.DataFrame]:
    """Float32 features of the chosen backbones side by side, for the usable rows of the chosen splits."""
    rows = store.rows()
    keep = (rows["status"] == STATUS_OK).to_numpy().copy()
    if splits is not None:
        keep &= rows["split"].isin(splits).to_numpy()
    if not keep.any():
        raise AmlRapidsError(f"store {store.path} has no usable rows in split(s) {', '.join(splits or ['any'])}")
    blocks = []
    for name in backbones:
        array = store.features(name)
        parts = [np.asarray(array[store.chunk_slice(k)][keep[store.chunk_slice(k)]], dtype=np.float32)
                 for k in range(store.n_chunks) if keep[store.chunk_slice(k)].any()]
        block = np.concatenate(parts)
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise AmlRapidsError(f"store {store.path}: {int(bad.sum())} rows of {name} features hold NaN or Inf")
        blocks.append(block)
    return np.concatenate(blocks, axis=1), rows[keep].reset_index(drop=True)


def fold_groups(rows: pd.DataFrame) -> np.ndarray:
    """Patients where every row has one, else cells: copies of a cell (or a patient's cells) share a fold."""
    patients = rows["patient"].to_numpy()
    return patients if (patients != "").all() else rows["cell_id"].to_numpy()
