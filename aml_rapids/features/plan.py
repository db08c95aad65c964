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
STATUS_NAMES = {STATUS_PENDING: "pending", STATUS_OK: "ok", STATUS_FAILED: "failed", STATUS_PADDING: "padding"}
SPLIT_ORDER = ("train", "val", "test")
TEXT_FIELDS = ("cell_id", "path", "label", "patient", "cohort", "split", "sha256", "pixels_sha256")
OPTIONAL_ROW_FIELDS = ("pixels_sha256", "finetune_seen")  # stores made before 0.5 (0.7) lack them
ROW_FIELDS = {**{name: str for name in TEXT_FIELDS}, "aug_index": np.int32, "fold": np.int32, "augment": bool,
              "status": np.int8, "finetune_seen": bool}
ROW_DEFAULTS = {"pixels_sha256": "", "finetune_seen": False}  # what an older store's missing field reads as
# What each row field holds, in words: the store writes it beside the field (its ``long_name``) for readers
# without aml-rapids.
ROW_LONG_NAMES = {
    "cell_id": "cell identifier (a hash of cohort and path)",
    "path": "image file, relative to the manifest's root",
    "label": "class label",
    "patient": "patient (empty where unknown)",
    "cohort": "data set the cell came from (by default the indexed folder's name)",
    "split": "train, val or test (all where the manifest is unsplit; empty for padding)",
    "sha256": "SHA-256 of the image file",
    "pixels_sha256": "SHA-256 of the decoded pixels (empty where not decoded at indexing)",
    "aug_index": "augmentation copy (0 the original, -1 padding)",
    "fold": "cross-validation fold (-1 none)",
    "augment": "whether the image was augmented",
    "status": "extraction status of the row",
    "finetune_seen": "whether a fine-tuned backbone trained or validated on this cell (never evaluated on)",
}


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
    rows = rows.assign(status=STATUS_PENDING, patient=rows["patient"].fillna(""), pixels_sha256=pixels,
                       finetune_seen=False)
    return rows[list(ROW_FIELDS)].reset_index(drop=True)


def pad_segments(rows: pd.DataFrame, chunk_rows: int) -> pd.DataFrame:
    """Close each split's last chunk with padding rows: status PADDING, every text field empty (``split`` too,
    so a reader filtering on split alone gets no padding), aug_index and fold -1. They keep their segment's
    ``augment`` flag, so a chunk's rows share one. Older stores (their attributes lack ``status_codes``) gave
    padding rows their segment's split; aml-rapids tells padding by its status alone, so they work as before."""
    parts = []
    for split in pd.unique(rows["split"]):
        segment = rows[rows["split"] == split]
        parts.append(segment)
        missing = -len(segment) % chunk_rows
        if missing:
            pad = {name: "" for name in TEXT_FIELDS}
            pad.update(aug_index=-1, fold=-1, augment=bool(segment["augment"].iloc[0]), status=STATUS_PADDING,
                       finetune_seen=False)
            parts.append(pd.DataFrame([pad] * missing))
    return pd.concat(parts, ignore_index=True)[list(ROW_FIELDS)]
