"""Patient-grouped k-fold cross-validation on a store extracted from a ``kfold`` manifest.

Each fold's classifier is fitted on the other folds' rows and predicts its own, so every cell gets exactly one
out-of-fold prediction from a model that never saw its patient. Oversampling of a fold's training part
replicates feature rows (the store holds one plain row per cell; augmented copies would need an extraction
per fold). The pooled out-of-fold predictions make one report, with per-fold results beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import RunConfig
from ..errors import DataError
from ..evaluate.metrics import labels_belong_to_patients, patient_level, summary
from ..evaluate.report import write_report
from ..features.store import FeatureStore
from ..loader.oversample import oversample
from .data import block_dims, load_features, refuse_finetune_seen, select_rows
from .train import describe_features, fit_model


def training_positions(rows, positions: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """The fold's training rows, each class replicated up to the largest when oversampling is on."""
    if not cfg.oversample.enabled:
        return positions
    return oversample(rows.iloc[positions].assign(_pos=positions), cfg.oversample.seed)["_pos"].to_numpy()


def _fold_result(rows, proba, classes) -> dict:
    cells = summary(rows["label"].to_numpy(), proba, classes)
    result = {"cells": cells["n"], "cell_accuracy": cells["accuracy"], "cell_macro_auc": cells["macro_auc"]}
    if (rows["patient"] != "").all() and labels_belong_to_patients(rows):  # not for cell types
        py, pproba = patient_level(rows, proba, classes)
        patients = summary(py, pproba, classes)
        result.update(patients=patients["n"], patient_accuracy=patients["accuracy"],
                      patient_macro_auc=patients["macro_auc"])
    return result


def cross_validate(store_path: Path, cfg: RunConfig, out: Path, backbones: list[str] | None = None,
                   on_fold=None) -> dict:
    """Fit one classifier per fold, report the pooled out-of-fold predictions (metrics.json, plots, CSV)."""
    store = FeatureStore.open(store_path)
    backbones = backbones or store.backbones
    keep, rows = select_rows(store, None)
    refuse_finetune_seen(store, rows, "the cross-validation's folds")
    X = load_features(store, backbones, keep)
    folds = rows["fold"].to_numpy()
    if (folds < 0).any():
        raise DataError(f"store {store_path} has rows without a fold: split the manifest with "
                        "`aml-rapids split --method kfold` before extracting, then cross-validate")
    classes = np.unique(rows["label"])
    dims = block_dims(store, backbones)
    proba = np.zeros((len(rows), len(classes)), dtype=np.float64)
    per_fold = []
    for k in np.unique(folds):
        held = np.flatnonzero(folds == k)
        train = training_positions(rows, np.flatnonzero(folds != k), cfg)
        model = fit_model(X[train], rows.iloc[train], dims, cfg)
        if list(model.classes_) != list(classes):
            raise DataError(f"fold {k}'s training part lacks class(es) "
                            f"{', '.join(sorted(set(classes) - set(model.classes_)))}; use fewer folds")
        proba[held] = model.predict_proba(X[held])
        per_fold.append({"fold": int(k), "training_rows": len(train),
                         **_fold_result(rows.iloc[held].reset_index(drop=True), proba[held], classes)})
        if on_fold:
            on_fold(per_fold[-1])
    info = {**describe_features(store, backbones), "backend": model.backend_}
    aucs = {key: [f[key] for f in per_fold if f.get(key) is not None] for key in ("cell_macro_auc", "patient_macro_auc")}
    extra = {"folds": per_fold, "oversampling": "feature rows replicated per fold" if cfg.oversample.enabled else "off",
             "fold_mean_sd": {k: [float(np.mean(v)), float(np.std(v))] for k, v in aucs.items() if v},
             "classify_config": cfg.classify.model_dump()}
    return write_report(rows, proba, classes, info, f"{len(per_fold)}-fold out-of-fold", out, cfg.evaluate, extra)
