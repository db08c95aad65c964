"""Fit the stacking classifier on a store's training rows, save it as one folder, and evaluate it."""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np

from .. import __version__
from ..config import RunConfig
from ..errors import AmlRapidsError
from ..evaluate.report import write_report
from ..features.store import FeatureStore
from .data import block_dims, feature_blocks, fold_groups, load_features, select_rows
from .backend import get_backend
from .model import FeatureStackingClassifier

MODEL_FILE, PORTABLE_FILE, INFO_FILE = "model.joblib", "model-sklearn.joblib", "model.json"


def describe_features(store: FeatureStore, backbones: list[str]) -> dict:
    """What a report must name: backbones, their weights and whether pretrained, and the split protocol."""
    split = (store.meta.get("manifests") or [{}])[-1].get("split") or {}
    return {"backbones": {b: {k: store.meta["backbones"][b][k] for k in ("weights", "pretrained", "dim")}
                          for b in backbones},
            "split_protocol": {"patient": "patient-level", "image": "image-level",
                               "kfold": "patient-level k-fold"}.get(split.get("method"), "unsplit"),
            "split": split}


def new_model(block_dims: tuple[int, ...], cfg: RunConfig) -> FeatureStackingClassifier:
    c = cfg.classify
    return FeatureStackingClassifier(block_dims=block_dims, pca_components=c.pca_components, pca_mode=c.pca_mode,
                                     svm_c=c.svm_c, rf_trees=c.rf_trees, rf_max_depth=c.rf_max_depth,
                                     rf_max_samples=c.rf_max_samples, folds=c.folds, seed=c.seed, backend=c.backend,
                                     n_jobs=c.n_jobs)


def fit_model(X, rows, block_dims: tuple[int, ...], cfg: RunConfig) -> FeatureStackingClassifier:
    """The configured classifier fitted on these rows, stacking folds grouped by patient (or cell)."""
    return new_model(block_dims, cfg).fit(X, rows["label"].to_numpy(), groups=fold_groups(rows))


def train(store_path: Path, cfg: RunConfig, out: Path, backbones: list[str] | None = None) -> dict:
    """Fit on the store's training rows: loaded whole when they fit in ``classify.memory_gb``, else streamed."""
    store = FeatureStore.open(store_path)
    backbones = backbones or store.backbones
    dims = block_dims(store, backbones)
    keep, rows = select_rows(store, ("train",))
    streamed = len(rows) * sum(dims) * 4 > cfg.classify.memory_gb * 2**30
    if streamed:
        model = new_model(dims, cfg)
        min_rows = max(model.pca_fit_components(len(rows)))
        model.fit_streaming(lambda: feature_blocks(store, backbones, keep, min_rows=min_rows),
                            rows["label"].to_numpy(), groups=fold_groups(rows))
    else:
        model = fit_model(load_features(store, backbones, keep), rows, dims, cfg)
    out.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out / MODEL_FILE)
    info = {"aml_rapids": __version__, "backend": model.backend_, "portable": _save_portable(model, out),
            "classes": [str(k) for k in model.classes_], "training_rows": len(rows),
            "reduction": "incremental PCA, streamed from the store" if streamed else "PCA in memory",
            "fit_seconds": model.fit_seconds_, "learner_seconds": model.learner_seconds_,
            "store": str(store_path), **describe_features(store, backbones),
            "config": cfg.classify.model_dump(), "extract_config": store.meta.get("config")}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def predict_store(model: FeatureStackingClassifier, store: FeatureStore, backbones: list[str],
                  splits: tuple[str, ...] | None, originals_only: bool = False):
    """Class probabilities of the usable rows of the chosen splits, a block of rows at a time."""
    keep, rows = select_rows(store, splits, originals_only)
    return np.concatenate([model.predict_proba(X) for X in feature_blocks(store, backbones, keep)]), rows


def _save_portable(model: FeatureStackingClassifier, out: Path) -> bool | str:
    """Beside a cuML model, its scikit-learn twin for machines without a GPU: True, or why there is none."""
    if model.backend_ == "sklearn":
        return True
    try:
        joblib.dump(model.to_sklearn(), out / PORTABLE_FILE)
    except AmlRapidsError as exc:
        return str(exc)
    return True


def load_model(model_dir: Path) -> tuple[FeatureStackingClassifier, dict]:
    """The model as trained where its backend runs here; else its scikit-learn twin; else a clear error."""
    info_path = Path(model_dir) / INFO_FILE
    if not info_path.is_file():
        raise AmlRapidsError(f"{model_dir} is not a model folder (no {INFO_FILE}; make one with `aml-rapids train`)")
    info = json.loads(info_path.read_text())
    if info.get("aml_rapids") != __version__:
        raise AmlRapidsError(f"model {model_dir} was made by aml-rapids {info.get('aml_rapids')}, this is "
                             f"{__version__}; retrain it")
    name = MODEL_FILE
    if info["backend"] != "sklearn" and get_backend("auto").name != info["backend"]:
        if info.get("portable") is not True:
            raise AmlRapidsError(f"model {model_dir} was trained with {info['backend']}, which does not run here, "
                                 f"and has no scikit-learn twin: {info.get('portable')}")
        name = PORTABLE_FILE
    try:
        return joblib.load(Path(model_dir) / name), info
    except Exception as exc:  # missing, truncated or written by other library versions
        raise AmlRapidsError(f"cannot load {Path(model_dir) / name}: {type(exc).__name__}: {exc}; retrain it") from exc


def evaluate(model_dir: Path, store_path: Path, split: str, out: Path) -> dict:
    """Metrics on one split (never the training rows), at cell level and, with patients, patient level."""
    if split == "train":
        raise AmlRapidsError("evaluating on the training split would report data the model was fitted on")
    model, info = load_model(model_dir)
    proba, rows = predict_store(model, FeatureStore.open(store_path), list(info["backbones"]), (split,))
    return write_report(rows, proba, model.classes_, info, split, out)
