"""A model folder: the fitted classifier (a pickle: code to trust, like any joblib file), its scikit-learn twin
beside a cuML model, the cells it was trained on, and ``model.json``, written last, with every file's sha256.

Each file is replaced atomically and ``model.json`` names the exact files it belongs to, so a folder that a kill,
a full disk or a later edit left inconsistent is refused on load, never used half-old and half-new.
"""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np
import pandas as pd

from .. import __version__
from ..data.manifest import same_content
from ..errors import AmlRapidsError, ConfigError, DataError
from ..features.store import FeatureStore, feature_identity, identity_differences
from ..outputs import atomic_write, atomic_write_text, file_sha256
from .model import FeatureStackingClassifier
from .backend import get_backend

MODEL_FILE, PORTABLE_FILE, INFO_FILE = "model.joblib", "model-sklearn.joblib", "model.json"
TRAINING_CELLS = "training_cells.parquet"  # cell_id, sha256, pixels_sha256, cohort, patient, label of each
# what a model folder holds besides run records: the model's files, and evaluations and predictions made with it
OUTPUTS = (MODEL_FILE, PORTABLE_FILE, TRAINING_CELLS, INFO_FILE, "eval-*", "predict-*")
PORTABLE_BACKENDS = ("sklearn", "torch")  # models any CPU runs as saved (torch: the patient-level model)


class ModelError(DataError):
    """A model folder that cannot be used: missing, damaged, edited, or made by another version."""


def save_model(model, out: Path, info: dict, training_rows: pd.DataFrame,
               identity: dict) -> dict:
    """Write the folder; returns ``info`` completed with the twin's state, the feature identity and file hashes."""
    atomic_write(out / MODEL_FILE, lambda tmp: joblib.dump(model, tmp))
    portable = _save_portable(model, out)
    cells = training_rows[["cell_id", "sha256", "pixels_sha256", "cohort", "patient", "label"]].drop_duplicates(
        "sha256")
    atomic_write(out / TRAINING_CELLS, lambda tmp: cells.to_parquet(tmp, index=False))
    names = [MODEL_FILE, TRAINING_CELLS] + ([PORTABLE_FILE] if model.backend_ not in PORTABLE_BACKENDS
                                            and portable is True else [])
    info = {**info, "portable": portable, "feature_identity": identity,
            "files": {name: file_sha256(out / name) for name in names}}
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2))
    return info


def _save_portable(model: FeatureStackingClassifier, out: Path) -> bool | str:
    """Beside a cuML model, its scikit-learn twin for machines without a GPU: True, or why there is none."""
    if model.backend_ in PORTABLE_BACKENDS:
        return True
    try:
        twin = model.to_sklearn()
    except AmlRapidsError as exc:
        return str(exc)
    atomic_write(out / PORTABLE_FILE, lambda tmp: joblib.dump(twin, tmp))
    return True


def read_info(model_dir: Path) -> dict:
    """``model.json``, checked: present, JSON, made by this version, naming its files."""
    path = Path(model_dir) / INFO_FILE
    if not path.is_file():
        raise ModelError(f"{model_dir} is not a model folder (no {INFO_FILE}; make one with `aml-rapids train`)")
    try:
        info = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path} is damaged ({exc}); retrain the model") from None
    if not isinstance(info, dict) or info.get("aml_rapids") != __version__:
        made_by = info.get("aml_rapids") if isinstance(info, dict) else None
        raise ModelError(f"model {model_dir} was made by aml-rapids {made_by}, this is {__version__}; retrain it")
    missing = [k for k in ("backend", "portable", "files", "backbones", "classes", "feature_identity")
               if k not in info]
    if missing:
        raise ModelError(f"{path} lacks {', '.join(missing)}; it was edited or damaged: retrain the model")
    return info


def _verified(model_dir: Path, name: str, info: dict) -> Path:
    path = Path(model_dir) / name
    expected = info["files"].get(name)
    if not path.is_file():
        raise ModelError(f"model file {path} is missing; retrain the model")
    if expected is None or file_sha256(path) != expected:
        raise ModelError(f"{path} is not the file {INFO_FILE} was written with (its sha256 differs: replaced, "
                         "edited or damaged); a model file is a pickle, so it is not loaded: retrain the model")
    return path


def load_model(model_dir: Path) -> tuple[FeatureStackingClassifier, dict]:
    """The model as trained where its backend runs here; else its scikit-learn twin; else a clear error."""
    info = read_info(model_dir)
    name = MODEL_FILE
    if info["backend"] not in PORTABLE_BACKENDS and get_backend("auto").name != info["backend"]:
        if info.get("portable") is not True:
            raise ModelError(f"model {model_dir} was trained with {info['backend']}, which does not run here, "
                             f"and has no scikit-learn twin: {info.get('portable')}")
        name = PORTABLE_FILE
    path = _verified(model_dir, name, info)
    try:
        return joblib.load(path), info
    except Exception as exc:  # truncated, or written by other library versions
        raise ModelError(f"cannot load {path}: {type(exc).__name__}: {exc}; retrain it") from exc


def load_cell_model(model_dir: Path, what: str) -> tuple[FeatureStackingClassifier, dict]:
    """``load_model``, refusing a patient-level model: ``what`` (a command) reads the cell classifier."""
    model, info = load_model(model_dir)
    if info.get("level") == "patient":
        raise ConfigError(f"model {model_dir} is a patient-level model (attention MIL), and {what} explains the cell "
                          "classifier: give it a model of `aml-rapids train` (--level cell)")
    return model, info


def training_cells(model_dir: Path, info: dict) -> pd.DataFrame:
    """The cells the model was trained on (one row per distinct content)."""
    path = _verified(model_dir, TRAINING_CELLS, info)
    return pd.read_parquet(path)


def seen_in_training(rows: pd.DataFrame, model_dir: Path, info: dict) -> np.ndarray:
    """Which rows are cells the model was trained on: the same file (sha256), or the same pixels in another
    file (a re-saved or converted copy; where both were indexed with their pixels decoded)."""
    cells = training_cells(model_dir, info)
    return same_content(rows, set(cells["sha256"]) | set(cells["pixels_sha256"].fillna(""))).to_numpy()


def check_features_match(info: dict, identity: dict, what: str) -> None:
    """Refuse features computed otherwise than the model's (networks, weights, image size, segmentation,
    dtype): a model given them would predict without a word of warning, and wrongly."""
    want = info["feature_identity"]
    try:
        have = feature_identity(identity, list(info["backbones"]))
    except KeyError as exc:
        raise ConfigError(f"{what} has no features of backbone {exc}, which the model reads") from None
    differs = identity_differences(have, want)
    if differs:
        raise ConfigError(f"{what} was computed otherwise than the features model was trained on (differs in "
                          f"{', '.join(differs)}); extract with the model's config")


def check_store_matches(info: dict, store: FeatureStore) -> None:
    check_features_match(info, store.meta, f"feature store {store.path}")
