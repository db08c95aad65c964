"""Predictions for new cells: from a feature store, or from a folder/CSV of images, extracted exactly as the
model's training features were (same backbones, weights and preprocessing, taken from the model folder)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..config import load_config
from ..data.manifest import build_manifest
from ..errors import AmlRapidsError
from ..evaluate.metrics import patient_means
from ..evaluate.report import prediction_table
from ..features.extract import extract
from ..features.store import ATTRS_KEY, FeatureStore
from .train import load_model, predict_store


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file() and ATTRS_KEY in (path / "zarr.json").read_text()


def predict(model_dir: Path, source: Path, out: Path, overrides: list[str] | None = None,
            progress=None, on_total=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-cell class probabilities and a per-patient summary (mean probabilities), also written as CSV."""
    model, info = load_model(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _is_store(source):
        store_path = source
    else:
        if not info.get("extract_config"):
            raise AmlRapidsError(f"model {model_dir} does not record how its features were extracted; predict "
                                 "from a feature store made with the same config instead")
        cfg = load_config(None, overrides, base=info["extract_config"])
        manifest = build_manifest(source, cfg.index).manifest
        store_path = out / "features.zarr"
        extract(manifest, store_path, cfg, progress=progress, on_total=on_total)
    proba, rows = predict_store(model, FeatureStore.open(store_path), list(info["backbones"]), None,
                                originals_only=True)
    classes = model.classes_
    cells = prediction_table(rows, proba, classes, ["cell_id", "path", "patient", "label", "split"])
    with_patient = (rows["patient"] != "").to_numpy()
    means = patient_means(rows[with_patient], proba[with_patient], classes)
    patients = pd.DataFrame({"patient": means.index, "n_cells": means["n_cells"].to_numpy(),
                             **{f"p_{c}": means[c].to_numpy() for c in classes}})
    patients["predicted"] = classes[means[list(classes)].to_numpy().argmax(axis=1)]
    cells.to_csv(out / "predictions.csv", index=False)
    patients.to_csv(out / "patients.csv", index=False)
    return cells, patients
