"""Fit the attention MIL model on a store's training patients into a model folder (``classify.io``, with the
cell-level model's versioning and refusals), evaluate it on a split, and predict patients of any store.

The patients that early stopping reads (the store's val split, or a share of the training patients) count as
training patients: a later evaluation refuses their cells like those the network was fitted on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..classify.data import block_dims, refuse_finetune_seen
from ..classify.io import OUTPUTS, check_store_matches, load_model, save_model, seen_in_training
from ..classify.train import describe_features
from ..config import EvaluateConfig, PatientsConfig, RunConfig
from ..errors import ConfigError
from ..features.store import FeatureStore, feature_identity
from ..outputs import prepare_fresh_dir
from .bags import Bags, read_bags
from .model import MODEL_OPTIONS, PatientMILClassifier
from .report import write_patient_report, write_tables

LEVEL = "patient"  # model.json's "level" for this model (the cell classifier's folders have none)


def new_model(dims: tuple[int, ...], settings: PatientsConfig) -> PatientMILClassifier:
    return PatientMILClassifier(block_dims=dims, **settings.model_dump(include=MODEL_OPTIONS))


def store_bags(store: FeatureStore, backbones: list[str], splits: tuple[str, ...] | None,
               settings: PatientsConfig | dict) -> Bags:
    """Bags as the ``patients`` settings (a config section, or a model's record of it) shape them."""
    options = settings if isinstance(settings, dict) else settings.model_dump()
    return read_bags(store, backbones, splits, options["include_augmented"], options["dedupe"])


def validation_words(model: PatientMILClassifier) -> str:
    if model.ensemble > 1:
        return f"{model.ensemble} folds of the training patients, one per network"
    return f"{model.members_[0]['validation_patients']} training patients held out (patients.val_fraction)"


def train(store_path: Path, cfg: RunConfig, out: Path, backbones: list[str] | None = None,
          overwrite: bool = False) -> dict:
    prepare_fresh_dir(out, "model folder", OUTPUTS, overwrite)
    store = FeatureStore.open(store_path)
    backbones = backbones or store.backbones
    dims = block_dims(store, backbones)
    bags = store_bags(store, backbones, ("train",), cfg.patients)
    has_val = "val" in set(store.rows()["split"])
    val = store_bags(store, backbones, ("val",), cfg.patients) if has_val else None
    model = new_model(dims, cfg.patients).fit(bags, val)
    seen = bags.rows if val is None else pd.concat([bags.rows, val.rows], ignore_index=True)
    info = {"aml_rapids": __version__, "level": LEVEL, "backend": model.backend_, "model": "attention MIL",
            "classes": [str(k) for k in model.classes_], "training_patients": len(bags),
            "validation_patients": len(val) if has_val else sum(m["validation_patients"] for m in model.members_),
            "validation": "the store's val split" if has_val else validation_words(model),
            "training_rows": int(seen.shape[0]), "bags_left_out": bags.left_out, "members": model.members_,
            "fit_seconds": {"total": model.fit_seconds_},
            "store": str(Path(store_path).absolute()), **describe_features(store, backbones),
            "config": cfg.patients.model_dump(mode="json"), "extract_config": store.meta.get("config")}
    return save_model(model, out, info, seen, feature_identity(store.meta, backbones))


def outputs_on(model: PatientMILClassifier, info: dict, store: FeatureStore, splits: tuple[str, ...] | None):
    """The model's bags of these splits (as it was trained to read them), their probabilities and attention."""
    bags = store_bags(store, list(info["backbones"]), splits, info["config"])
    proba, attention = model.outputs(bags)
    return bags, proba, attention


def evaluate(model_dir: Path, store_path: Path, split: str, out: Path, settings: EvaluateConfig) -> dict:
    """Patient-level metrics on one split; refused on other features and on any cell the model trained on or
    stopped early by."""
    model, info = load_model(model_dir)
    store = FeatureStore.open(store_path)
    check_store_matches(info, store)
    bags = store_bags(store, list(info["backbones"]), (split,), info["config"])
    refuse_finetune_seen(store, bags.rows, f"split {split}")
    seen = seen_in_training(bags.rows, model_dir, info)
    if seen.any():
        raise ConfigError(f"{int(seen.sum()):,} of the {len(seen):,} cells of split {split} in {store_path} are cells "
                          f"model {model_dir} was trained or stopped early on (same content, e.g. "
                          f"{bags.rows['path'].to_numpy()[np.argmax(seen)]}): their metrics would be leaked; "
                          "evaluate on patients the model never saw")
    proba, attention = model.outputs(bags)
    source = {**describe_features(store, list(info["backbones"]))["source"], "model": str(model_dir),
              "model_files_sha256": info.get("files")}
    return write_patient_report(bags, proba, attention, model.classes_, {**info, "source": source}, split, out,
                                settings, info["config"]["top_cells"])


def predict(model: PatientMILClassifier, info: dict, store: FeatureStore, model_dir: Path, out: Path):
    """Every patient of the store called, its cells ranked by attention: predictions.csv and patients.csv in
    ``out`` (cells of the model's training patients flagged in ``in_training``)."""
    bags, proba, attention = outputs_on(model, info, store, None)
    return write_tables(bags, proba, attention, model.classes_, out, info["config"]["top_cells"],
                        ("cell_id", "path", "cohort", "patient", "label", "split"),
                        {"in_training": seen_in_training(bags.rows, model_dir, info)})
