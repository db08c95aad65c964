"""Classification metrics as the method reports them (per class one-vs-rest accuracy, precision, sensitivity,
specificity, F1; macro averages), plus confusion matrix, one-vs-rest ROC AUC and bootstrap 95% intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, roc_auc_score


def per_class(y_true: np.ndarray, y_pred: np.ndarray, classes: np.ndarray) -> dict:
    return _per_class(confusion_matrix(y_true, y_pred, labels=classes), classes)


def _per_class(cm: np.ndarray, classes: np.ndarray) -> dict:
    total = cm.sum()
    out = {}
    for i, name in enumerate(classes):
        tp = cm[i, i]
        fn, fp = cm[i].sum() - tp, cm[:, i].sum() - tp
        tn = total - tp - fn - fp
        precision = tp / (tp + fp) if tp + fp else 0.0
        sensitivity = tp / (tp + fn) if tp + fn else 0.0
        out[str(name)] = {
            "accuracy_ovr": (tp + tn) / total, "precision": precision, "sensitivity": sensitivity,
            "specificity": tn / (tn + fp) if tn + fp else 0.0,
            "f1": 2 * precision * sensitivity / (precision + sensitivity) if precision + sensitivity else 0.0,
            "support": int(cm[i].sum()),
        }
    return out


def summary(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict:
    """Point estimates: accuracy, macro metrics, per-class metrics, ROC AUC (one-vs-rest), confusion matrix."""
    y_pred = classes[proba.argmax(axis=1)]
    classes_present = np.isin(classes, y_true)
    cm = confusion_matrix(y_true, y_pred, labels=classes)  # once: with string labels it is the slow part
    metrics = _per_class(cm, classes)
    macro = {k: float(np.mean([m[k] for m in metrics.values()]))
             for k in ("precision", "sensitivity", "specificity", "f1", "accuracy_ovr")}
    auc = {}
    for i, name in enumerate(classes):
        if classes_present[i] and not (y_true == name).all():
            auc[str(name)] = float(roc_auc_score(y_true == name, proba[:, i]))
    return {"n": int(len(y_true)), "accuracy": float((y_pred == y_true).mean()), "macro": macro,
            "auc": auc, "macro_auc": float(np.mean(list(auc.values()))) if auc else None,
            "per_class": metrics,
            "confusion": {"labels": [str(c) for c in classes], "matrix": cm.tolist()}}


def bootstrap(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray, groups: np.ndarray | None = None,
              n: int = 1000, seed: int = 0) -> dict:
    """95% intervals of accuracy, macro F1 and macro AUC, resampling rows (or whole groups, e.g. patients)
    within each class, so every resample holds every class as often as the data does: a resample that missed a
    class would count its F1 as 0 and pull the macro F1's interval below the estimate on small test sets. Groups
    whose rows carry several labels (a patient's cell types) are resampled without strata: they have no one
    class."""
    rng = np.random.default_rng(seed)
    if groups is None:
        strata = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]

        def resample():
            return np.concatenate([rng.choice(rows, len(rows)) for rows in strata])
    else:
        _, inverse = np.unique(groups, return_inverse=True)
        members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
        unit_class = np.array([y_true[rows[0]] for rows in members])  # a patient's class: its cells' label
        one_label = all((y_true[rows] == y_true[rows[0]]).all() for rows in members)
        # a patient whose cells carry several labels (cell types) has no class to stratify by: one stratum
        strata = ([np.flatnonzero(unit_class == c) for c in np.unique(unit_class)] if one_label
                  else [np.arange(len(members))])

        def resample():
            return np.concatenate([members[i] for units in strata for i in rng.choice(units, len(units))])
    draws = {"accuracy": [], "macro_f1": [], "macro_auc": []}
    for _ in range(n):
        idx = resample()
        s = summary(y_true[idx], proba[idx], classes)
        draws["accuracy"].append(s["accuracy"])
        draws["macro_f1"].append(s["macro"]["f1"])
        if s["macro_auc"] is not None:
            draws["macro_auc"].append(s["macro_auc"])
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in draws.items() if v}


def patient_keys(rows: pd.DataFrame) -> np.ndarray:
    """One key per patient: cohort and name, so same-named patients of two cohorts stay two patients."""
    patients = rows["patient"].astype(str).to_numpy()
    if "cohort" not in rows:
        return patients
    return (rows["cohort"].astype(str) + "/" + rows["patient"].astype(str)).to_numpy()


def labels_belong_to_patients(rows: pd.DataFrame) -> bool:
    """Whether every patient's cells carry one label (a diagnosis), so a patient-level result means something;
    cell types, of which one patient has many, do not."""
    return bool(rows.assign(key=patient_keys(rows)).groupby("key")["label"].nunique().max() == 1)


def patient_means(rows: pd.DataFrame, proba: np.ndarray, classes: np.ndarray) -> pd.DataFrame:
    """The method's patient-level prediction: per patient (the index, ``patient_keys``), the mean of its cells'
    class probabilities (one column per class), its cell count (``n_cells``), label, cohort and name."""
    frame = pd.DataFrame(proba, columns=list(classes)).assign(
        key=patient_keys(rows), patient=rows["patient"].to_numpy(), label=rows["label"].to_numpy(),
        cohort=rows["cohort"].to_numpy() if "cohort" in rows else "")
    grouped = frame.groupby("key")
    first = grouped[["label", "cohort", "patient"]].first()
    return grouped[list(classes)].mean().assign(n_cells=grouped.size(), **{c: first[c] for c in first})


def patient_level(rows: pd.DataFrame, proba: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each patient's label and the mean of its cells' class probabilities."""
    means = patient_means(rows, proba, classes)
    return means["label"].to_numpy(), means[list(classes)].to_numpy()
