"""One evaluation report for predictions on held-out rows: metrics.json, the plots (PNG and SVG) and every
cell's prediction, at cell level and, where rows carry patients, at patient level. ``evaluate`` (one split) and
``cv`` (pooled out-of-fold predictions) both write it.

metrics.json says what it rests on: the store and the manifests extracted into it, the model, the split protocol
and seed, the bootstrap's settings, the code's commit and the time, and warnings where a class has too few
cells or patients for its numbers to mean much."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np

from ..config import EvaluateConfig
from ..errors import DataError
from ..outputs import atomic_write_text
from ..provenance import current_run_id, git_commit
from .metrics import bootstrap, labels_belong_to_patients, patient_keys, patient_level, summary
from .plots import plot_confusion, plot_roc

PREDICTIONS = "predictions.csv"  # one line per evaluated cell
SPLIT_PROTOCOLS = {"patient": "patient-grouped split", "image": "image-level split", "kfold": "patient-grouped k-fold",
                   "all": "every row in training, nothing held out"}


def _cohort_protocol(split: dict) -> str:
    words = (f"cohort-level: trained on {', '.join(split.get('train_cohorts') or ['?'])}, tested on "
             f"{', '.join(split['test_cohorts'])}")
    if split.get("val_cohorts"):
        return words + f", validated on {', '.join(split['val_cohorts'])}"
    within = split.get("val_within")
    return words + (f" (val held out of the training cohorts, grouped by {within})" if within else "")


def split_protocol(split: dict | None) -> str:
    """How a report names the split a manifest was made with (its ``split`` record)."""
    split = split or {}
    if split.get("method") == "cohort":
        return _cohort_protocol(split)
    return SPLIT_PROTOCOLS.get(split.get("method"), "unsplit")


def prediction_table(rows, proba, classes, columns: list[str]):
    """One line per cell: the chosen columns of ``rows``, the predicted class and each class's probability
    (``p_<class>``), as predict, evaluate and cv write them."""
    return rows[columns].reset_index(drop=True).assign(
        predicted=classes[proba.argmax(axis=1)], **{f"p_{c}": proba[:, i] for i, c in enumerate(classes)})


def stamped(source: dict) -> dict:
    """Where a report's rows came from, with the code's commit, the run id and the time."""
    return {**source, "git_commit": git_commit(), "run_id": current_run_id(),
            "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def weights_words(backbone: dict) -> str:
    """How a report names a backbone's weights: fine-tuned on what, pretrained, or NOT pretrained."""
    if backbone.get("finetuned"):
        return backbone["finetuned"]["words"]
    return "pretrained" if backbone["pretrained"] else "NOT pretrained"


def small_sample_warnings(rows, classes, split: str, settings: EvaluateConfig) -> list[str]:
    """Classes whose cells (or patients) in these rows are too few for their metrics to mean much."""
    y = rows["label"].to_numpy()
    cells = {c: int((y == c).sum()) for c in classes}
    warnings = [f"class {c} is absent from split {split}: its sensitivity and AUC are undefined"
                for c, n in cells.items() if n == 0]
    few = {c: n for c, n in cells.items() if 0 < n < settings.min_positives}
    if few:
        warnings.append(f"{len(few)} of {len(classes)} classes have fewer than evaluate.min_positives = "
                        f"{settings.min_positives} cells in split {split} (" + ", ".join(f"{c} {n}" for c, n in few.items())
                        + "): their cell-level sensitivity and AUC are coarse")
    if (rows["patient"] != "").all():
        keys = patient_keys(rows)
        patients = {c: len(set(keys[y == c])) for c, n in cells.items() if n}
        few = {c: n for c, n in patients.items() if n < settings.min_patients}
        if few:
            warnings.append(f"{len(few)} of {len(classes)} classes have fewer than evaluate.min_patients = "
                            f"{settings.min_patients} patients in split {split} ("
                            + ", ".join(f"{c} {n}" for c, n in few.items())
                            + "): their results rest on these few people, which the intervals cannot show")
    return warnings


def _cell_level(rows, proba, classes, has_patients: bool, draws: dict) -> dict:
    """Cell-level metrics with 95% intervals, the bootstrap resampling patients where the rows have them."""
    y = rows["label"].to_numpy()
    return {**summary(y, proba, classes),
            "ci95": bootstrap(y, proba, classes, patient_keys(rows) if has_patients else None, **draws)}


def write_report(rows, proba, classes, info: dict, split: str, out: Path, settings: EvaluateConfig,
                 extra: dict | None = None) -> dict:
    """metrics.json, plots and predictions.csv for predictions on held-out rows; ``info`` names protocol,
    backbones, backend and where the rows came from (``source``); ``extra`` is added to the report as it is."""
    y, proba = rows["label"].to_numpy(), np.asarray(proba)
    unseen = sorted(set(y) - set(classes))
    if unseen:
        raise DataError(f"split {split} holds classes the model never saw: {', '.join(unseen)}")
    has_patients = (rows["patient"] != "").all()
    draws = {"n": settings.bootstrap_samples, "seed": settings.bootstrap_seed}
    report = {"split": split, **{k: info[k] for k in ("split_protocol", "backbones", "backend")},
              "source": stamped(info["source"]),
              "bootstrap": {"samples": draws["n"], "seed": draws["seed"], "interval": "percentile 95%",
                            "resampled": ("cells, within each class" if not has_patients else
                                          "patients, within each class" if labels_belong_to_patients(rows) else
                                          "patients, unstratified (a patient holds cells of several classes)")},
              "warnings": small_sample_warnings(rows, classes, split, settings),
              "cell_level": _cell_level(rows, proba, classes, has_patients, draws)}
    cohorts = sorted(map(str, rows["cohort"].unique())) if "cohort" in rows else []
    if len(cohorts) > 1:  # a model retrained on a new cohort: how it does on each, side by side
        report["by_cohort"] = {c: _cell_level(rows[(rows["cohort"] == c).to_numpy()],
                                              proba[(rows["cohort"] == c).to_numpy()], classes, has_patients, draws)
                               for c in cohorts}
    out.mkdir(parents=True, exist_ok=True)
    words = sorted({weights_words(b) for b in info["backbones"].values()})
    title = f"{split} split ({info['split_protocol']}), {'+'.join(info['backbones'])} ({'; '.join(words)})"
    plot_confusion(y, classes[proba.argmax(axis=1)], classes, f"cells: {title}", out / "confusion.png")
    plot_roc(y, proba, classes, f"cells: {title}", out / "roc.png")
    if has_patients and not labels_belong_to_patients(rows):
        report["warnings"].append("labels vary within patients (cell types): no patient-level result")
    if has_patients and labels_belong_to_patients(rows):
        py, pproba = patient_level(rows, proba, classes)
        report["patient_level"] = {**summary(py, pproba, classes), "ci95": bootstrap(py, pproba, classes, **draws)}
        plot_roc(py, pproba, classes, f"patients: {title}", out / "roc_patients.png")
    report.update(extra or {})
    columns = [c for c in ("cell_id", "path", "cohort", "patient", "label") if c in rows]
    columns += ["fold"] if "fold" in rows and (rows["fold"] >= 0).all() else []  # cross-validation's
    table = prediction_table(rows, np.asarray(proba), classes, columns)
    atomic_write_text(out / PREDICTIONS, table.to_csv(index=False))
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2))
    return report
