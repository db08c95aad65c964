"""Which rows a feature store holds, in which order: one segment per split, each starting on a chunk boundary.

Training rows are oversampled and augmented (one row per copy, told apart by ``aug_index``), validation and
test rows are not. Padding rows close each segment's last chunk, so every chunk belongs to one segment and is
processed in whole batches: a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import RunConfig
from ..loader.oversample import loader_table

STATUS_PENDING, STATUS_OK, STATUS_FAILED, STATUS_PADDING = 0, 1, 2, 3
SPLIT_ORDER = ("train", "val", "test")
TEXT_FIELDS = ("cell_id", "path", "label", "patient", "cohort", "split", "sha256", "pixels_sha256")
OPTIONAL_ROW_FIELDS = ("pixels_sha256",)  # stores made before 0.5 lack it
ROW_FIELDS = {**{name: str for name in TEXT_FIELDS}, "aug_index": np.int32, "fold": np.int32, "augment": bool,
              "status": np.int8}


def plan_rows(table: pd.DataFrame, cfg: RunConfig) -> pd.DataFrame:
    """Unpadded rows of every segment, in store order, with ``augment`` and ``status`` columns."""
    if "split" in table.columns:
        splits = [s for s in SPLIT_ORDER if (table["split"] == s).any()]
        splits += sorted(set(table["split"]) - set(SPLIT_ORDER))
        parts = [loader_table(table, s, cfg.oversample.enabled, cfg.oversample.seed).assign(
            augment=s == "train" and cfg.augment.enabled) for s in splits]
        rows = pd.concat(parts, ignore_index=True)
    else:
        rows = table.assign(split="all", aug_index=0, augment=False)
    if "fold" not in rows.columns:
        rows = rows.assign(fold=-1)
    pixels = rows["pixels_sha256"].fillna("") if "pixels_sha256" in rows else ""
    rows = rows.assign(status=STATUS_PENDING, patient=rows["patient"].fillna(""), pixels_sha256=pixels)
    return rows[list(ROW_FIELDS)].reset_index(drop=True)


def pad_segments(rows: pd.DataFrame, chunk_rows: int) -> pd.DataFrame:
    """Close each split's last chunk with padding rows (status PADDING, empty ids)."""
    parts = []
    for split in pd.unique(rows["split"]):
        segment = rows[rows["split"] == split]
        parts.append(segment)
        missing = -len(segment) % chunk_rows
        if missing:
            pad = {name: "" for name in TEXT_FIELDS}
            pad.update(split=split, aug_index=-1, fold=-1, augment=bool(segment["augment"].iloc[0]),
                       status=STATUS_PADDING)
            parts.append(pd.DataFrame([pad] * missing))
    return pd.concat(parts, ignore_index=True)[list(ROW_FIELDS)]
