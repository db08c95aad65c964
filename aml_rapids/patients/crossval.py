"""Patient-level models compared on the same patient-grouped folds: attention MIL against pooled cell scores.

In each fold of a ``kfold`` store, on the other folds' patients, the stacking classifier is fitted on their
cells and the attention MIL model on their bags; the held-out patients get the MIL call, and the mean and
quantiles of their cells' stacking probabilities (the baselines). Both see the same cells: the bags' (originals,
one per content within a patient, unless configured otherwise). Every patient gets one out-of-fold score from
each model; metrics.json holds each model's patient-level metrics with bootstrap intervals, McNemar's test of
attention MIL against each baseline (on patients), and the per-fold results.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..classify.crossval import training_positions
from ..classify.data import block_dims, refuse_finetune_seen
from ..classify.train import describe_features, fit_model
from ..config import RunConfig
from ..errors import DataError
from ..evaluate.metrics import bootstrap, summary
from ..evaluate.plots import plot_macro_rocs
from ..evaluate.report import small_sample_warnings, stamped
from ..features.store import FeatureStore
from ..outputs import atomic_write_text
from ..study.compare import mcnemar_test
from .pooling import pooled, pooling_name
from .report import cell_table
from .train import new_model, store_bags

MIL = "attention MIL"


def check_folds(table: pd.DataFrame, cells: pd.DataFrame, store_path: Path) -> np.ndarray:
    """Each patient's fold (``table``: one line per bag; ``cells``: the bags' rows), refusing a store without
    folds, a patient whose cells lie in two folds, and a class with fewer patients than folds."""
    if "fold" not in table:
        raise DataError(f"store {store_path} has rows without a fold: split the manifest with "
                        "`aml-rapids split --method kfold` before extracting, then cross-validate")
    spread = cells.groupby("key")["fold"].nunique()
    if (spread > 1).any():
        raise DataError(f"store {store_path}: patient {spread.index[spread.argmax()]} has cells in "
                        f"{spread.max()} folds; a patient-grouped cross-validation needs each patient in one "
                        "(split with `aml-rapids split --method kfold`, which keeps patients whole)")
    folds = table["fold"].to_numpy()
    per_class = table.groupby("label")["fold"].nunique()
    short = per_class[per_class < len(np.unique(folds))]
    if not short.empty:
        raise DataError(f"class {short.index[0]} has patients in only {short.iloc[0]} of the "
                        f"{len(np.unique(folds))} folds (fewer patients than folds): a fold without it cannot "
                        "test it; split with fewer folds (split.folds)")
    return folds


def _level(labels, proba, classes, draws) -> dict:
    return {**summary(labels, proba, classes), "ci95": bootstrap(labels, proba, classes, **draws)}


def compare(store_path: Path, cfg: RunConfig, out: Path, backbones: list[str] | None = None, on_fold=None) -> dict:
    store = FeatureStore.open(store_path)
    backbones = backbones or store.backbones
    dims = block_dims(store, backbones)
    bags = store_bags(store, backbones, None, cfg.patients)
    refuse_finetune_seen(store, bags.rows, "the cross-validation's folds")
    table = bags.table()
    folds = check_folds(table, bags.rows, store_path)
    classes = np.unique(bags.labels)
    names = [MIL] + [pooling_name(how) for how in ("mean", *cfg.patients.quantiles)]
    scores = {name: np.zeros((len(bags), len(classes))) for name in names}
    attention = np.zeros(len(bags.rows))
    per_fold = []
    for k in np.unique(folds):
        held_at, train_at = np.flatnonzero(folds == k), np.flatnonzero(folds != k)
        train, held = bags.subset(train_at), bags.subset(held_at)
        started = time.perf_counter()
        positions = training_positions(train.rows, np.arange(len(train.rows)), cfg)
        cells = fit_model(train.X[positions], train.rows.iloc[positions], dims, cfg)
        cell_seconds = time.perf_counter() - started
        cell_proba = cells.predict_proba(held.X)
        for how in ("mean", *cfg.patients.quantiles):
            scores[pooling_name(how)][held_at] = pooled(held, cell_proba, how)
        mil = new_model(dims, cfg.patients).fit(train)
        proba, weights = mil.outputs(held)
        scores[MIL][held_at] = proba
        attention[np.concatenate([np.arange(bags.offsets[i], bags.offsets[i + 1]) for i in held_at])] = \
            cell_table(held, proba, weights, classes)["attention"].to_numpy()
        per_fold.append({"fold": int(k), "patients": len(held), "training_patients": len(train),
                         "stacking_fit_seconds": cell_seconds, "mil_fit_seconds": mil.fit_seconds_,
                         "mil_best_epochs": [m["best_epoch"] for m in mil.members_],
                         **{f"{name} macro AUC": summary(held.labels, scores[name][held_at], classes)["macro_auc"]
                            for name in names}})
        if on_fold:
            on_fold(per_fold[-1])
    draws = {"n": cfg.evaluate.bootstrap_samples, "seed": cfg.evaluate.bootstrap_seed}
    models = {name: _level(bags.labels, scores[name], classes, draws) for name in names}
    correct = {name: classes[scores[name].argmax(axis=1)] == bags.labels for name in names}
    info = describe_features(store, backbones)
    report = {"split": f"{len(per_fold)}-fold out-of-fold", "level": "patient",
              "backend": f"{cells.backend_} (stacking), torch (attention MIL)",
              "split_protocol": info["split_protocol"], "backbones": info["backbones"],
              "source": stamped(info["source"]),
              "bags": {"patients": len(bags), "cells": int(bags.sizes.sum()), "left_out": bags.left_out},
              "bootstrap": {"samples": draws["n"], "seed": draws["seed"], "interval": "percentile 95%",
                            "resampled": "patients, within each class"},
              "warnings": small_sample_warnings(bags.rows, classes, "all folds", cfg.evaluate), "models": models,
              "mcnemar_vs_attention_mil": {name: mcnemar_test(correct[MIL], correct[name]) for name in names[1:]},
              "folds": per_fold, "patients_config": cfg.patients.model_dump(mode="json"),
              "classify_config": cfg.classify.model_dump()}
    write_outputs(out, report, table, scores, classes, bags, attention)
    return report


def write_outputs(out: Path, report: dict, table: pd.DataFrame, scores: dict, classes: np.ndarray, bags,
                  attention: np.ndarray) -> None:
    """metrics.json, patients.csv (every model's out-of-fold probabilities), attention.csv (each cell's MIL
    attention, as its held-out fold's model gave it) and one ROC plot of every model."""
    out.mkdir(parents=True, exist_ok=True)
    patients = table.drop(columns="key").assign(**{f"{name}: p_{c}": scores[name][:, i] for name in scores
                                                   for i, c in enumerate(classes)})
    atomic_write_text(out / "patients.csv", patients.to_csv(index=False))
    cells = bags.rows[["cell_id", "path", "cohort", "patient", "label"]].assign(attention=attention)
    atomic_write_text(out / "attention.csv", cells.to_csv(index=False))
    title = (f"patients, {report['split']} ({report['split_protocol']}), "
             f"{'+'.join(report['backbones'])}, {report['bags']['patients']} patients")
    plot_macro_rocs({name: (bags.labels, scores[name], classes) for name in scores}, title, out / "roc_patients.png")
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2))
