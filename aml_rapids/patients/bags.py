"""Bags of cells: per patient, the stored features of its usable cells, read chunk by chunk from the store.

A patient is its cohort and name (``patient_keys``), so same-named patients of two cohorts stay two bags. Each
bag's rows are contiguous (``offsets``), and every row of a bag belongs to that one patient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..classify.data import load_features, select_rows
from ..errors import DataError
from ..evaluate.metrics import patient_keys
from ..features.plan import STATUS_OK, STATUS_PADDING
from ..features.store import FeatureStore


@dataclass
class Bags:
    rows: pd.DataFrame  # the cells' store rows, bag after bag, with their patient's ``key``
    X: np.ndarray  # float32 (cells, sum of the backbones' widths), in the order of ``rows``
    keys: np.ndarray  # one per bag: cohort/patient
    labels: np.ndarray  # one per bag: its patient's class
    offsets: np.ndarray  # bag i is rows offsets[i]:offsets[i + 1]
    left_out: dict[str, int] = field(default_factory=dict)  # cells not in any bag, by reason

    def __len__(self) -> int:
        return len(self.keys)

    def cells(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, bags: np.ndarray) -> "Bags":
        """The chosen bags (positions), in that order."""
        spans = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in bags]
        cells = np.concatenate(spans) if spans else np.zeros(0, dtype=int)
        sizes = np.array([len(s) for s in spans], dtype=np.int64)
        return Bags(self.rows.iloc[cells].reset_index(drop=True), self.X[cells], self.keys[bags], self.labels[bags],
                    np.concatenate([[0], np.cumsum(sizes)]), dict(self.left_out))

    def table(self) -> pd.DataFrame:
        """One line per bag: key, cohort, patient, label, cells, and fold where the rows have one."""
        first = self.rows.iloc[self.offsets[:-1]]
        table = pd.DataFrame({"key": self.keys, "cohort": first["cohort"].to_numpy(),
                              "patient": first["patient"].to_numpy(), "label": self.labels, "cells": self.sizes})
        if "fold" in first and (first["fold"] >= 0).all():
            table["fold"] = first["fold"].to_numpy()
        return table


def _chosen_rows(store: FeatureStore, splits: tuple[str, ...] | None) -> pd.DataFrame:
    rows = store.rows()
    rows = rows[rows["status"] != STATUS_PADDING]
    return rows if splits is None else rows[rows["split"].isin(splits)]


def read_bags(store: FeatureStore, backbones: list[str], splits: tuple[str, ...] | None,
              include_augmented: bool = False, dedupe: bool = True) -> Bags:
    """The bags of the chosen splits' patients (all splits: None). ``dedupe`` keeps one cell per content within a
    patient (a dataset may hold a file twice, under two names). Refused: rows without a patient, a patient whose
    cells all failed, a patient whose cells carry two classes."""
    keep, rows = select_rows(store, splits, originals_only=not include_augmented)
    where = f"store {store.path}" + (f", split(s) {', '.join(splits)}" if splits else "")
    nameless = (rows["patient"] == "").to_numpy()
    if nameless.any():
        raise DataError(f"{where}: {int(nameless.sum()):,} of {len(rows):,} cells have no patient (e.g. "
                        f"{rows['path'].iloc[nameless.argmax()]}); a patient-level model needs a patient for every "
                        "cell: index <class>/<patient>/<image> folders, or a CSV with a patient column")
    rows = rows.assign(key=patient_keys(rows))
    chosen = _chosen_rows(store, splits)
    empty = sorted(set(patient_keys(chosen[chosen["status"] != STATUS_OK])) - set(rows["key"]))
    if empty:
        raise DataError(f"{where}: {len(empty)} patient(s) have no usable cell (every cell failed to extract): "
                        f"{', '.join(empty[:5])}; re-run `aml-rapids extract` once their files are back, or "
                        "index without them")
    classes = rows.groupby("key")["label"].nunique()
    mixed = classes.index[classes > 1].tolist()
    if mixed:
        raise DataError(f"{where}: patient {mixed[0]} has cells of {classes[mixed[0]]} classes "
                        f"({', '.join(sorted(set(rows.loc[rows['key'] == mixed[0], 'label'])))}); a patient's "
                        "cells must carry its one diagnosis")
    X = load_features(store, backbones, keep)
    augmented = (chosen["status"] == STATUS_OK) & (chosen["aug_index"] > 0)
    left_out = {"augmented copies": 0 if include_augmented else int(augmented.sum())}
    if dedupe:
        content = rows["sha256"].where(rows["sha256"] != "", rows["cell_id"])  # no hash: every cell distinct
        unique = ~pd.DataFrame({"key": rows["key"], "content": content}).duplicated().to_numpy()
        left_out["same content within a patient"] = int((~unique).sum())
        rows, X = rows[unique].reset_index(drop=True), X[unique]
    order = np.argsort(rows["key"].to_numpy(), kind="stable")
    rows, X = rows.iloc[order].reset_index(drop=True), X[order]
    keys, starts = np.unique(rows["key"].to_numpy(), return_index=True)
    offsets = np.append(starts, len(rows))
    return Bags(rows, X, keys, rows["label"].to_numpy()[starts], offsets, left_out)
