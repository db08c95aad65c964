"""One evaluation report for predictions on held-out rows: metrics.json plus the PNG plots, at cell level and,
where rows carry patients, at patient level. ``evaluate`` (one split) and ``cv`` (pooled folds) both write it."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from .metrics import bootstrap, patient_keys, patient_level, summary
from .plots import confusion_png, roc_png


def prediction_table(rows, proba, classes, columns: list[str]):
    """One line per cell: the chosen columns of ``rows``, the predicted class and each class's probability
    (``p_<class>``), as predict and cv write them."""
    return rows[columns].reset_index(drop=True).assign(
        predicted=classes[proba.argmax(axis=1)], **{f"p_{c}": proba[:, i] for i, c in enumerate(classes)})


def write_report(rows, proba, classes, info: dict, split: str, out: Path, extra: dict | None = None) -> dict:
    """metrics.json and plots for predictions on held-out rows; ``info`` names protocol, backbones, backend;
    ``extra`` is added to the report as it is."""
    y = rows["label"].to_numpy()
    unseen = sorted(set(y) - set(classes))
    if unseen:
        raise DataError(f"split {split} holds classes the model never saw: {', '.join(unseen)}")
    has_patients = (rows["patient"] != "").all()
    absent = [str(c) for c in classes if c not in set(y)]
    report = {"split": split, **{k: info[k] for k in ("split_protocol", "backbones", "backend")},
              "warnings": [f"class {c} is absent from split {split}: its sensitivity and AUC are undefined"
                           for c in absent],
              "cell_level": {**summary(y, proba, classes),
                             "ci95": bootstrap(y, proba, classes, patient_keys(rows) if has_patients else None)}}
    out.mkdir(parents=True, exist_ok=True)
    pretrained = "pretrained" if all(b["pretrained"] for b in info["backbones"].values()) else "NOT pretrained"
    title = f"{split} split ({info['split_protocol']}), {'+'.join(info['backbones'])} ({pretrained})"
    confusion_png(y, classes[proba.argmax(axis=1)], classes, f"cells: {title}", out / "confusion.png")
    roc_png(y, proba, classes, f"cells: {title}", out / "roc.png")
    if has_patients:
        py, pproba = patient_level(rows, proba, classes)
        report["patient_level"] = {**summary(py, pproba, classes), "ci95": bootstrap(py, pproba, classes)}
        roc_png(py, pproba, classes, f"patients: {title}", out / "roc_patients.png")
    report.update(extra or {})
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    return report
