"""The rows of a fine-tuning, from a split manifest: the training rows oversampled as extraction does them,
the validation rows (a fixed class-stratified sample if asked), the test rows; each epoch's order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import RunConfig
from ..data.manifest import Manifest
from ..errors import DataError
from ..loader.oversample import loader_table


@dataclass
class Tables:
    """The rows of a fine-tuning: oversampled training rows, validation rows (a fixed sample if asked), test."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    classes: list[str]

    def labels(self, table: pd.DataFrame) -> np.ndarray:
        return table["label"].map({c: i for i, c in enumerate(self.classes)}).to_numpy(np.int64)


def stratified_sample(table: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """``n`` rows with the classes in their proportions (all rows if ``n`` is None or not smaller)."""
    if n is None or n >= len(table):
        return table.reset_index(drop=True)
    shuffled = table.sample(frac=1.0, random_state=seed)
    rank = shuffled.groupby("label").cumcount() / shuffled["label"].map(shuffled["label"].value_counts())
    return shuffled.assign(_rank=rank.to_numpy()).sort_values(["_rank", "label"], kind="stable").head(n).drop(
        columns="_rank").reset_index(drop=True)


def training_tables(manifest: Manifest, cfg: RunConfig, where: Path) -> Tables:
    table = manifest.table.assign(patient=manifest.table["patient"].fillna(""))
    if "split" not in table.columns:
        raise DataError(f"manifest {where} has no split; run `aml-rapids split` first")
    parts = {s: table[table["split"] == s] for s in ("train", "val", "test")}
    if parts["train"].empty or parts["val"].empty:
        raise DataError(f"manifest {where} has no {'train' if parts['train'].empty else 'val'} rows: fine-tuning "
                        "trains on train and validates on val; split it with split.val > 0 (the published 70/15/15)")
    classes = sorted(table["label"].unique())
    missing = [c for c in classes if not (parts["train"]["label"] == c).any()]
    if missing:
        raise DataError(f"manifest {where}: class(es) {', '.join(missing)} have no training rows; the new head "
                        "could never learn them")
    train = loader_table(table, "train", cfg.oversample.enabled, cfg.oversample.seed)
    val = stratified_sample(parts["val"], cfg.finetune.val_max_rows, cfg.finetune.seed)
    return Tables(train, val.assign(aug_index=0), parts["test"].assign(aug_index=0).reset_index(drop=True), classes)


def epoch_table(train: pd.DataFrame, seed: int, epoch: int) -> pd.DataFrame:
    """The training rows in epoch ``epoch``'s order, a function of (seed, epoch) alone."""
    order = np.random.default_rng([seed, epoch]).permutation(len(train))
    return train.iloc[order].reset_index(drop=True)
