"""Rows and features of a feature store, read chunk by chunk, checked before any estimator sees them.

``feature_blocks`` never holds more than one block of rows; ``load_features`` is all blocks side by side, for
data that fits in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError
from ..evaluate.metrics import patient_keys
from ..features.plan import STATUS_OK, STATUS_PADDING, STATUS_PENDING
from ..features.store import FeatureStore


def block_dims(store: FeatureStore, backbones: list[str]) -> tuple[int, ...]:
    """Each chosen backbone's feature width, refusing a backbone the store does not hold (naming those it has)."""
    return tuple(store.features(name).shape[1] for name in backbones)


def select_rows(store: FeatureStore, splits: tuple[str, ...] | None,
                originals_only: bool = False) -> tuple[np.ndarray, pd.DataFrame]:
    """The usable rows of the chosen splits (without oversampled copies if asked): a mask over the store's
    rows, and their metadata. A split the store lacks is a config error; a store whose extraction has not
    finished for these splits is refused (its results would rest on whichever rows happened to be done)."""
    rows = store.rows()
    keep = (rows["status"] == STATUS_OK).to_numpy().copy()
    chosen = np.ones(len(rows), dtype=bool) if splits is None else rows["split"].isin(splits).to_numpy()
    known = set(rows.loc[rows["status"] != STATUS_PADDING, "split"])  # padding: no split (older stores: its segment's)
    if splits is not None and not set(splits) <= known:
        raise ConfigError(f"store {store.path} has no split {', '.join(sorted(set(splits) - known))}; it has "
                          f"{', '.join(sorted(known))}")
    pending = int((chosen & (rows["status"] == STATUS_PENDING).to_numpy()).sum())
    if pending:
        raise DataError(f"store {store.path} is not complete: {pending:,} rows of split(s) "
                        f"{', '.join(splits or ['any'])} are not extracted yet; finish with `aml-rapids extract`")
    keep &= chosen
    if originals_only:
        keep &= (rows["aug_index"] <= 0).to_numpy()
    if not keep.any():
        raise DataError(f"store {store.path} has no usable rows in split(s) {', '.join(splits or ['any'])}")
    return keep, rows[keep].reset_index(drop=True)


def refuse_finetune_seen(store: FeatureStore, rows: pd.DataFrame, what: str) -> None:
    """Refuse to report on cells a fine-tuned backbone of the store trained or validated on: their features
    were fitted to their labels, so any metric on them is leaked."""
    seen = rows["finetune_seen"].to_numpy(bool)
    if not seen.any():
        return
    tuned = [f"{name} ({b['finetuned']['words']}, {b['weights']})" for name, b in store.meta["backbones"].items()
             if b.get("finetuned")]
    raise ConfigError(f"{int(seen.sum()):,} of the {len(rows):,} rows of {what} in store {store.path} are cells "
                      f"the store's fine-tuned backbone trained or validated on: {'; '.join(tuned)} (e.g. "
                      f"{rows['path'].to_numpy()[seen.argmax()]}); their metrics would be leaked: evaluate on cells "
                      "the fine-tuning never saw (its test split)")


def feature_blocks(store: FeatureStore, backbones: list[str], keep: np.ndarray, min_rows: int = 1,
                   chunks_per_block: int = 8) -> Iterator[np.ndarray]:
    """Float32 features of the chosen backbones side by side, for the kept rows, ``chunks_per_block`` store
    chunks at a time, in row order. A last block under ``min_rows`` rows joins the one before it (an
    incremental PCA needs at least its component count of rows per step)."""
    arrays = {name: store.features(name) for name in backbones}
    pending = None
    for first in range(0, store.n_chunks, chunks_per_block):
        span = slice(first * store.chunk_rows, min(first + chunks_per_block, store.n_chunks) * store.chunk_rows)
        mine = keep[span]
        if not mine.any():
            continue
        block = np.concatenate([np.asarray(store.read(arrays[name].path, span)[mine], dtype=np.float32)
                                for name in backbones], axis=1)
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise DataError(f"store {store.path}: {int(bad.sum())} rows of features (rows "
                            f"{span.start}-{span.stop - 1}) hold NaN or Inf, though marked usable (a chunk file "
                            "lost?); run `aml-rapids extract` on the store again to recompute lost chunks")
        if pending is not None and min(len(pending), len(block)) < min_rows:
            block = np.concatenate([pending, block])
        elif pending is not None:
            yield pending
        pending = block
    if pending is not None:
        yield pending


def load_features(store: FeatureStore, backbones: list[str], keep: np.ndarray) -> np.ndarray:
    """Float32 features of the chosen backbones side by side, for the kept rows, all in memory."""
    return np.concatenate(list(feature_blocks(store, backbones, keep)))


def fold_groups(rows: pd.DataFrame) -> np.ndarray:
    """Patients where every row has one, else cells: copies of a cell (or a patient's cells) share a fold."""
    has_patients = (rows["patient"] != "").all()
    return patient_keys(rows) if has_patients else rows["cell_id"].to_numpy()
