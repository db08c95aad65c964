"""Fit the stacking classifier on a store's training rows, save it as one folder (``io``), and evaluate it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import __version__
from ..config import EvaluateConfig, RunConfig
from ..errors import ConfigError
from ..evaluate.report import split_protocol, write_report
from ..features.store import FeatureStore, feature_identity
from .data import block_dims, feature_blocks, fold_groups, load_features, refuse_finetune_seen, select_rows
from ..outputs import prepare_fresh_dir
from .io import OUTPUTS, check_store_matches, load_model, save_model, seen_in_training
from .model import FeatureStackingClassifier


def describe_features(store: FeatureStore, backbones: list[str]) -> dict:
    """What a report must name: backbones, their weights and whether pretrained, the split protocol, and the
    store and manifests the rows came from."""
    manifests = store.meta.get("manifests") or [{}]
    split = manifests[-1].get("split") or {}
    return {"backbones": {b: {k: store.meta["backbones"][b].get(k) for k in ("weights", "pretrained", "dim",
                                                                         "finetuned")} for b in backbones},
            "split_protocol": stores_protocol(manifests),
            "split": split,
            "source": {"store": str(store.path), "split": split,
                       "manifests": [{k: m.get(k) for k in ("digest", "source", "rows", "time_utc")}
                                     for m in manifests]}}


def stores_protocol(manifests: list[dict]) -> str:
    """The split protocol in words; a store of several manifests split apart (a cohort appended with its own
    split) names each with its cohorts."""
    words = [split_protocol(m.get("split")) for m in manifests]
    if len(set(words)) == 1:
        return words[0]
    return " + ".join(f"{w} ({', '.join(m.get('cohorts') or ['?'])})" for w, m in zip(words, manifests))


def new_model(block_dims: tuple[int, ...], cfg: RunConfig) -> FeatureStackingClassifier:
    return FeatureStackingClassifier(block_dims=block_dims, **cfg.classify.model_dump(exclude={"memory_gb"}))


def fit_model(X, rows, block_dims: tuple[int, ...], cfg: RunConfig) -> FeatureStackingClassifier:
    """The configured classifier fitted on these rows, stacking folds grouped by patient (or cell)."""
    return new_model(block_dims, cfg).fit(X, rows["label"].to_numpy(), groups=fold_groups(rows))


def train(store_path: Path, cfg: RunConfig, out: Path, backbones: list[str] | None = None,
          overwrite: bool = False) -> dict:
    """Fit on the store's training rows: loaded whole when they fit in ``classify.memory_gb``, else streamed (or,
    on a Dask cluster, reduced by PCA on its workers).
    ``out`` is a new or empty folder, or (``overwrite``) one holding only an earlier model and its reports."""
    prepare_fresh_dir(out, "model folder", OUTPUTS, overwrite)
    store = FeatureStore.open(store_path)
    backbones = backbones or store.backbones
    dims = block_dims(store, backbones)
    keep, rows = select_rows(store, ("train",))
    streamed = len(rows) * sum(dims) * 4 > cfg.classify.memory_gb * 2**30
    if streamed and cfg.scale.cluster != "none":
        from ..scale.reduce import fit_on_cluster

        model = fit_on_cluster(new_model(dims, cfg), store, backbones, keep, rows["label"].to_numpy(),
                               groups=fold_groups(rows))
        reduction = "PCA on the Dask cluster (covariance over the store's chunks)"
    elif streamed:
        model = new_model(dims, cfg)
        min_rows = max(model.pca_fit_components(len(rows)), default=1)
        model.fit_streaming(lambda: feature_blocks(store, backbones, keep, min_rows=min_rows),
                            rows["label"].to_numpy(), groups=fold_groups(rows))
        reduction = "incremental PCA, streamed from the store"
    else:
        model = fit_model(load_features(store, backbones, keep), rows, dims, cfg)
        reduction = "PCA in memory"
    info = {"aml_rapids": __version__, "backend": model.backend_,
            "classes": [str(k) for k in model.classes_], "training_rows": len(rows),
            "reduction": reduction,
            "fit_seconds": model.fit_seconds_, "learner_seconds": model.learner_seconds_,
            "store": str(Path(store_path).absolute()), **describe_features(store, backbones),
            "config": cfg.classify.model_dump(), "extract_config": store.meta.get("config")}
    return save_model(model, out, info, rows, feature_identity(store.meta, backbones))


def predict_store(model: FeatureStackingClassifier, store: FeatureStore, backbones: list[str],
                  splits: tuple[str, ...] | None, originals_only: bool = False):
    """Class probabilities of the usable rows of the chosen splits, a block of rows at a time."""
    keep, rows = select_rows(store, splits, originals_only)
    return np.concatenate([model.predict_proba(X) for X in feature_blocks(store, backbones, keep)]), rows


def check_evaluable(split: str) -> None:
    if split == "train":
        raise ConfigError("evaluating on the training split would report data the model was fitted on")


def evaluate(model_dir: Path, store_path: Path, split: str, out: Path, settings: EvaluateConfig | None = None) -> dict:
    """Metrics on one split, at cell level and, with patients, patient level; refused on features made
    otherwise than the model's and on any cell the model was trained on (by content, whatever its split)."""
    check_evaluable(split)
    model, info = load_model(model_dir)
    store = FeatureStore.open(store_path)
    check_store_matches(info, store)
    _, rows = select_rows(store, (split,))
    refuse_finetune_seen(store, rows, f"split {split}")
    seen = seen_in_training(rows, model_dir, info)
    if seen.any():  # refused before any prediction is made
        example = rows["path"].to_numpy()[seen.argmax()]
        raise ConfigError(f"{int(seen.sum()):,} of the {len(rows):,} rows of split {split} in {store_path} are "
                          f"cells model {model_dir} was trained on (same content, e.g. {example}): their metrics "
                          "would be leaked; evaluate on cells the model never saw")
    proba, rows = predict_store(model, store, list(info["backbones"]), (split,))
    source = {**describe_features(store, list(info["backbones"]))["source"], "model": str(model_dir),
              "model_files_sha256": info.get("files")}
    return write_report(rows, proba, model.classes_, {**info, "source": source}, split, out,
                        settings or EvaluateConfig())
