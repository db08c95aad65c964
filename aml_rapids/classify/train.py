"""Fit the stacking classifier on a store's training rows, save it as one folder, and evaluate it."""

from __future__ import annotations

import json
from pathlib import Path

import joblib

from .. import __version__
from ..config import RunConfig
from ..errors import AmlRapidsError
from ..evaluate.metrics import bootstrap, patient_level, summary
from ..evaluate.plots import confusion_png, roc_png
from ..features.store import FeatureStore
from .data import fold_groups, load_rows
from .model import FeatureStackingClassifier

MODEL_FILE, INFO_FILE = "model.joblib", "model.json"


def describe_features(store: FeatureStore, backbones: list[str]) -> dict:
    """What a report must name: backbones, their weights and whether pretrained, and the split protocol."""
    split = (store.meta.get("manifests") or [{}])[-1].get("split") or {}
    return {"backbones": {b: {k: store.meta["backbones"][b][k] for k in ("weights", "pretrained", "dim")}
                          for b in backbones},
            "split_protocol": {"patient": "patient-level", "image": "image-level",
                               "kfold": "patient-level k-fold"}.get(split.get("method"), "unsplit"),
            "split": split}


def train(store_path: Path, cfg: RunConfig, out: Path, backbones: list[str] | None = None) -> dict:
    store = FeatureStore.open(store_path)
    backbones = backbones or store.backbones
    X, rows = load_rows(store, backbones, ("train",))
    c = cfg.classify
    model = FeatureStackingClassifier(block_dims=tuple(store.meta["backbones"][b]["dim"] for b in backbones),
                                      pca_components=c.pca_components, svm_c=c.svm_c, rf_trees=c.rf_trees,
                                      folds=c.folds, seed=c.seed, backend=c.backend)
    model.fit(X, rows["label"].to_numpy(), groups=fold_groups(rows))
    out.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out / MODEL_FILE)
    info = {"aml_rapids": __version__, "backend": model.backend_, "classes": [str(k) for k in model.classes_],
            "training_rows": len(rows), "store": str(store_path), **describe_features(store, backbones),
            "config": cfg.classify.model_dump(), "extract_config": store.meta.get("config")}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def load_model(model_dir: Path) -> tuple[FeatureStackingClassifier, dict]:
    info_path = Path(model_dir) / INFO_FILE
    if not info_path.is_file():
        raise AmlRapidsError(f"{model_dir} is not a model folder (no {INFO_FILE}; make one with `aml-rapids train`)")
    info = json.loads(info_path.read_text())
    if info.get("aml_rapids") != __version__:
        raise AmlRapidsError(f"model {model_dir} was made by aml-rapids {info.get('aml_rapids')}, this is "
                             f"{__version__}; retrain it")
    return joblib.load(Path(model_dir) / MODEL_FILE), info


def evaluate(model_dir: Path, store_path: Path, split: str, out: Path) -> dict:
    """Metrics on one split (never the training rows), at cell level and, with patients, patient level."""
    if split == "train":
        raise AmlRapidsError("evaluating on the training split would report data the model was fitted on")
    model, info = load_model(model_dir)
    store = FeatureStore.open(store_path)
    X, rows = load_rows(store, list(info["backbones"]), (split,))
    proba = model.predict_proba(X)
    y, classes = rows["label"].to_numpy(), model.classes_
    unseen = sorted(set(y) - set(classes))
    if unseen:
        raise AmlRapidsError(f"split {split} holds classes the model never saw: {', '.join(unseen)}")
    has_patients = (rows["patient"] != "").all()
    absent = [str(c) for c in classes if c not in set(y)]
    report = {"split": split, **{k: info[k] for k in ("split_protocol", "backbones", "backend")},
              "warnings": [f"class {c} is absent from split {split}: its sensitivity and AUC are undefined"
                           for c in absent],
              "cell_level": {**summary(y, proba, classes),
                             "ci95": bootstrap(y, proba, classes, rows["patient"].to_numpy() if has_patients else None)}}
    out.mkdir(parents=True, exist_ok=True)
    pretrained = "pretrained" if all(b["pretrained"] for b in info["backbones"].values()) else "NOT pretrained"
    title = f"{split} split ({info['split_protocol']}), {'+'.join(info['backbones'])} ({pretrained})"
    confusion_png(y, classes[proba.argmax(axis=1)], classes, f"cells: {title}", out / "confusion.png")
    roc_png(y, proba, classes, f"cells: {title}", out / "roc.png")
    if has_patients:
        py, pproba = patient_level(rows, proba, classes)
        report["patient_level"] = {**summary(py, pproba, classes), "ci95": bootstrap(py, pproba, classes)}
        roc_png(py, pproba, classes, f"patients: {title}", out / "roc_patients.png")
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    return report
