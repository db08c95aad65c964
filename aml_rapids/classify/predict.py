"""Predictions for new cells: from a feature store, or from a folder/CSV of images, extracted exactly as the
model's training features were (same backbones, weights and preprocessing, taken from the model folder).

Every run starts from an empty output folder (or ``overwrite`` clears this command's own files first), so two
datasets' cells never share a predictions.csv and same-named patients of two cohorts never share a mean.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import RunConfig, load_config
from ..data.manifest import build_manifest
from ..data.scan import Problem
from ..errors import ConfigError, OutputError
from ..evaluate.metrics import patient_means
from ..evaluate.report import prediction_table
from ..features.extract import extract, load_backbones, store_identity
from ..features.lock import lock_path
from ..features.store import ATTRS_KEY, FeatureStore
from ..loader.loader import resolve_device
from ..outputs import prepare_output_dir
from .io import check_features_match, check_store_matches, load_model, training_cells
from .train import predict_store

OUTPUTS = ("predictions.csv", "patients.csv", "failed.csv", "features.zarr")


@dataclass
class Prediction:
    cells: pd.DataFrame
    patients: pd.DataFrame
    failures: list[Problem] = field(default_factory=list)  # cells whose files could not be read
    seen_in_training: int = 0  # cells the model was trained on: their predictions are no test of it
    config: RunConfig | None = None  # how the images were extracted (None: read from a given store)


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file() and ATTRS_KEY in (path / "zarr.json").read_text()


def prepare_predict_dir(out: Path, overwrite: bool) -> Path:
    """An empty output folder; with ``overwrite``, one cleared of this command's own files. A folder holding
    anything else is refused either way: nothing of the user's is deleted or mixed in."""
    prepare_output_dir(out, "prediction folder")
    ours = {*OUTPUTS, lock_path(out / "features.zarr").name, "runs", "config.yaml"}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
    earlier = sorted(name for name in OUTPUTS if (out / name).exists())
    if foreign:
        raise OutputError(f"prediction folder {out} holds files predict did not write ({', '.join(foreign[:5])}); "
                          "predict into a new folder")
    if earlier and not overwrite:
        raise OutputError(f"prediction folder {out} already holds predictions ({', '.join(earlier)}); predict "
                          "into a new folder, or pass --overwrite to replace them")
    for name in earlier:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    return out


def predict(model_dir: Path, source: Path, out: Path, overrides: list[str] | None = None,
            progress=None, on_total=None) -> Prediction:
    """Per-cell class probabilities and a per-patient summary (mean probabilities), also written as CSV."""
    model, info = load_model(model_dir)
    failures: list[Problem] = []
    cfg = None
    if _is_store(source):
        store_path = source
        check_store_matches(info, FeatureStore.open(store_path))
    else:
        if not info.get("extract_config"):
            raise ConfigError(f"model {model_dir} does not record how its features were extracted; predict "
                              "from a feature store made with the same config instead")
        cfg = load_config(None, overrides, base=info["extract_config"])
        manifest = build_manifest(source, cfg.index).manifest
        device = resolve_device(cfg.loader.device)
        backbones = load_backbones(cfg, "cuda" if device == "gpu" else "cpu")
        asked = "the features this run would extract (the model's extraction config" + (
            f" with --set {', '.join(overrides)})" if overrides else ")")
        check_features_match(info, store_identity(cfg, backbones), asked)
        store_path = out / "features.zarr"
        failures = extract(manifest, store_path, cfg, progress=progress, on_total=on_total,
                           backbones=backbones).failures
    proba, rows = predict_store(model, FeatureStore.open(store_path), list(info["backbones"]), None,
                                originals_only=True)
    classes = model.classes_
    cells = prediction_table(rows, proba, classes, ["cell_id", "path", "cohort", "patient", "label", "split"])
    cells["in_training"] = rows["sha256"].isin(training_cells(model_dir, info)["sha256"]).to_numpy()
    with_patient = (rows["patient"] != "").to_numpy()
    means = patient_means(rows[with_patient], proba[with_patient], classes)
    patients = pd.DataFrame({"cohort": means["cohort"].to_numpy(), "patient": means["patient"].to_numpy(),
                             "n_cells": means["n_cells"].to_numpy(),
                             **{f"p_{c}": means[c].to_numpy() for c in classes}})
    patients["predicted"] = classes[means[list(classes)].to_numpy().argmax(axis=1)]
    cells.to_csv(out / "predictions.csv", index=False)
    patients.to_csv(out / "patients.csv", index=False)
    if failures:
        pd.DataFrame([(p.path, p.reason) for p in failures], columns=["path", "reason"]).to_csv(
            out / "failed.csv", index=False)
    return Prediction(cells, patients, failures, int(cells["in_training"].sum()), cfg)
