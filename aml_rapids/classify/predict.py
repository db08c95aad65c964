"""Predictions for new cells: from a feature store, or from a folder/CSV of images, extracted exactly as the
model's training features were (same backbones, weights and preprocessing, taken from the model folder)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..config import load_config
from ..data.manifest import build_manifest
from ..errors import AmlRapidsError
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
    cells = rows[["cell_id", "path", "patient", "label", "split"]].copy()
    cells["predicted"] = model.classes_[proba.argmax(axis=1)]
    for i, name in enumerate(model.classes_):
        cells[f"p_{name}"] = proba[:, i]
    prob_cols = [f"p_{name}" for name in model.classes_]
    patients = (cells[cells["patient"] != ""].groupby("patient")
                .agg(n_cells=("cell_id", "size"), **{c: (c, "mean") for c in prob_cols}).reset_index())
    patients["predicted"] = [model.classes_[i] for i in patients[prob_cols].to_numpy().argmax(axis=1)]
    cells.to_csv(out / "predictions.csv", index=False)
    patients.to_csv(out / "patients.csv", index=False)
    return cells, patients
