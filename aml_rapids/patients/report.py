"""What a patient-level model's evaluation or prediction writes: patients.csv (one line per patient, its class
probabilities and its most attended cells), predictions.csv (one line per cell with its attention, which
``aml-rapids gallery`` reads) and, for an evaluation, metrics.json and plots at patient level.

A cell's ``p_<class>`` columns in predictions.csv are its patient's probabilities (the model calls patients, not
cells); ``attention`` is the cell's share of its patient's pooled embedding (of the called class's branch with
per-class attention), ``attention_rank`` 1 its most attended cell.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import EvaluateConfig
from ..errors import DataError
from ..evaluate.metrics import bootstrap, patient_keys, summary
from ..evaluate.plots import plot_confusion, plot_roc
from ..evaluate.report import PREDICTIONS, small_sample_warnings, stamped, weights_words
from ..outputs import atomic_write_text
from .bags import Bags

PATIENTS = "patients.csv"


def patient_table(bags: Bags, proba: np.ndarray, classes: np.ndarray) -> pd.DataFrame:
    table = bags.table().drop(columns="key").rename(columns={"cells": "n_cells"})
    return table.assign(predicted=classes[proba.argmax(axis=1)],
                        **{f"p_{c}": proba[:, i] for i, c in enumerate(classes)})


def cell_table(bags: Bags, proba: np.ndarray, attention: np.ndarray, classes: np.ndarray,
               columns: tuple[str, ...] = ("cell_id", "path", "cohort", "patient", "label")) -> pd.DataFrame:
    """One line per cell: its columns of ``columns``, its patient's call and probabilities, its attention."""
    bag_of = np.repeat(np.arange(len(bags)), bags.sizes)
    called = proba.argmax(axis=1)
    branch = called[bag_of] if attention.shape[1] > 1 else np.zeros(len(bag_of), dtype=int)
    weight = attention[np.arange(len(bag_of)), branch]
    cells = bags.rows[[c for c in columns if c in bags.rows]].reset_index(drop=True).assign(
        predicted=classes[called[bag_of]], **{f"p_{c}": proba[bag_of, i] for i, c in enumerate(classes)},
        attention=weight)
    cells["attention_rank"] = cells.assign(bag=bag_of).groupby("bag")["attention"].rank(
        ascending=False, method="first").astype(int)
    return cells


def with_top_cells(patients: pd.DataFrame, cells: pd.DataFrame, k: int) -> pd.DataFrame:
    """``patients`` with ``top_cells``: the cell ids of each patient's ``k`` most attended cells, best first."""
    top = cells[cells["attention_rank"] <= k].sort_values("attention_rank")
    listed = top.groupby(patient_keys(top))["cell_id"].agg(" ".join)
    return patients.assign(top_cells=pd.Series(patient_keys(patients)).map(listed).fillna("").to_numpy())


def write_patient_report(bags: Bags, proba: np.ndarray, attention: np.ndarray, classes: np.ndarray, info: dict,
                         split: str, out: Path, settings: EvaluateConfig, top_cells: int) -> dict:
    """metrics.json (patient level, bootstrap intervals resampling patients within each class), the patient
    confusion matrix and ROC, patients.csv and predictions.csv."""
    unseen = sorted(set(bags.labels) - set(classes))
    if unseen:
        raise DataError(f"split {split} holds classes the model never saw: {', '.join(unseen)}")
    draws = {"n": settings.bootstrap_samples, "seed": settings.bootstrap_seed}
    report = {"split": split, "level": "patient", **{k: info[k] for k in ("split_protocol", "backbones", "backend")},
              "model": "attention MIL", "source": stamped(info["source"]),
              "bootstrap": {"samples": draws["n"], "seed": draws["seed"], "interval": "percentile 95%",
                            "resampled": "patients, within each class"},
              "bags": {"patients": len(bags), "cells": int(bags.sizes.sum()), "left_out": bags.left_out},
              "warnings": small_sample_warnings(bags.rows, classes, split, settings),
              "patient_level": {**summary(bags.labels, proba, classes),
                                "ci95": bootstrap(bags.labels, proba, classes, **draws)}}
    out.mkdir(parents=True, exist_ok=True)
    words = sorted({weights_words(b) for b in info["backbones"].values()})
    title = f"{split} split ({info['split_protocol']}), {'+'.join(info['backbones'])} ({'; '.join(words)})"
    plot_confusion(bags.labels, classes[proba.argmax(axis=1)], classes, f"patients, attention MIL: {title}",
                   out / "confusion_patients.png")
    plot_roc(bags.labels, proba, classes, f"patients, attention MIL: {title}", out / "roc_patients.png")
    write_tables(bags, proba, attention, classes, out, top_cells)
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2))
    return report


def write_tables(bags: Bags, proba: np.ndarray, attention: np.ndarray, classes: np.ndarray, out: Path,
                 top_cells: int, columns: tuple[str, ...] = ("cell_id", "path", "cohort", "patient", "label"),
                 extra: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """patients.csv and predictions.csv (with ``extra`` columns, one value per cell); returns both tables."""
    cells = cell_table(bags, proba, attention, classes, columns).assign(**(extra or {}))
    patients = with_top_cells(patient_table(bags, proba, classes), cells, top_cells)
    atomic_write_text(out / PATIENTS, patients.to_csv(index=False))
    atomic_write_text(out / PREDICTIONS, cells.to_csv(index=False))
    return cells, patients
