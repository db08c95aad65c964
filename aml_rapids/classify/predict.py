"""Predictions for new cells: from a feature store, or from a folder/CSV of images, extracted exactly as the
model's training features were (same backbones, weights and preprocessing, taken from the model folder).

Every run starts from an empty output folder (or ``overwrite`` clears this command's own earlier files first), so
two datasets' cells never share a predictions.csv; patients are keyed by cohort and name, so same-named patients
of two cohorts never share a mean. The new cells are then compared with the model's training store (drift.json,
drift.png: ``cohorts.drift``), so a cohort unlike the one the model learnt from is flagged beside its predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..cohorts.drift import Drift, class_mix, comparable_backbones, measure_drift, training_cohorts, write_drift
from ..cohorts.plots import plot_drift
from ..config import DriftConfig, RunConfig, load_config
from ..data.manifest import build_manifest
from ..data.scan import NoUsableImages, Problem, printable
from ..errors import ConfigError, DataError, OutputError
from ..evaluate.metrics import patient_means
from ..evaluate.report import prediction_table
from ..features.engines import calibration_cells
from ..features.extract import extract, load_backbones, store_identity
from ..features.lock import lock_path
from ..features.store import ATTRS_KEY, FeatureStore
from ..loader.loader import resolve_device
from ..logs import say
from ..outputs import atomic_write_text, prepare_fresh_dir
from ..patients.train import LEVEL as PATIENT_LEVEL, predict as predict_patients
from .io import check_features_match, check_store_matches, load_model, seen_in_training
from .train import predict_store

FAILED = "failed.csv"  # every given image that could not be used, and why
SOURCE = "source.txt"  # what this folder predicts (written first), so an interrupted run resumes only its own
OUTPUTS = ("predictions.csv", "patients.csv", FAILED, "features.zarr", "features.zarr.partial", "drift.json",
           "drift.png", "drift.svg", SOURCE)


@dataclass
class Prediction:
    cells: pd.DataFrame
    patients: pd.DataFrame
    failures: list[Problem] = field(default_factory=list)  # given images that could not be used, and why
    seen_in_training: int = 0  # cells the model was trained on: their predictions are no test of it
    config: RunConfig | None = None  # how the images were extracted (None: read from a given store)
    warnings: list[str] = field(default_factory=list)
    drift: Drift | None = None  # these cells against the model's training store (None: not checked; warnings say why)


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file() and ATTRS_KEY in (path / "zarr.json").read_text()


def predict(model_dir: Path, source: Path, out: Path, overrides: list[str] | None = None, overwrite: bool = False,
            progress=None, on_total=None, check_drift: bool = True) -> Prediction:
    """Per-cell class probabilities and a per-patient summary (mean probabilities), also written as CSV into
    ``out``: a new or empty folder, or (``overwrite``) one holding only an earlier prediction's files. With
    ``check_drift``, the cells are compared with the model's training store (settings: the config's drift)."""
    model, info = load_model(model_dir)  # first, so that a mistyped model folder makes no output folder
    resuming = _unfinished(out, source) and not overwrite
    if resuming:
        say(f"resuming the unfinished prediction in {out}")
    else:
        prepare_fresh_dir(out, "prediction folder", (*OUTPUTS, lock_path(out / "features.zarr").name), overwrite)
        atomic_write_text(out / SOURCE, str(Path(source).resolve()))
    failures: list[Problem] = []
    warnings: list[str] = []
    cfg = None
    if _is_store(source):
        store_path = source
        check_store_matches(info, FeatureStore.open(store_path))
    else:
        if not info.get("extract_config"):
            raise ConfigError(f"model {model_dir} does not record how its features were extracted; predict "
                              "from a feature store made with the same config instead")
        # where to run is this invocation's choice (--set scale...), never the cluster the model's store was made on
        made = {key: value for key, value in info["extract_config"].items() if key != "scale"}
        cfg = load_config(None, overrides, base=made)
        try:
            indexed = build_manifest(source, cfg.index)
        except NoUsableImages as exc:
            _write_failures(exc.problems, out)
            raise DataError(f"{exc}" + (f"; {out / FAILED} lists why" if exc.problems else "")) from None
        manifest, warnings = indexed.manifest, indexed.warnings
        failures = [p for p in indexed.problems if not p.skipped]
        device = resolve_device(cfg.loader.device)
        backbones = load_backbones(cfg, "cuda" if device == "gpu" else "cpu",
                                   lambda norms: calibration_cells(manifest, cfg, norms))
        asked = "the features this run would extract (the model's extraction config" + (
            f" with --set {', '.join(overrides)})" if overrides else ")")
        check_features_match(info, store_identity(cfg, backbones), asked)
        store_path = out / "features.zarr"
        on_cluster = cfg.scale.cluster != "none"  # its workers load the networks themselves
        failures += extract(manifest, store_path, cfg, progress=progress, on_total=on_total,
                            backbones=None if on_cluster else backbones).failures
    store = FeatureStore.open(store_path)
    if info.get("level") == PATIENT_LEVEL:
        cells, patients = predict_patients(model, info, store, model_dir, out)
    else:
        cells, patients = _cell_predictions(model, info, store, model_dir, out)
    _write_failures(failures, out)
    drift = None
    if check_drift:
        settings = (cfg or load_config(None, overrides)).drift
        drift, why_not = _drift_check(model, info, model_dir, store, cells, settings, out)
        warnings += [why_not] if why_not else []
    unknown = sorted(set(cells["label"]) - set(map(str, model.classes_)))
    if unknown and cfg is not None and source.suffix.lower() != ".csv":
        warnings.append(f"the first-level folder names ({', '.join(unknown[:5])}) are not the model's classes: a "
                        "folder is read as <class>/<patient>/<image> or <class>/<image>, so in a folder of "
                        "<patient>/<image> the patients are taken for classes and the cells have none; give a CSV "
                        "with path, label (any text) and patient columns instead")
    return Prediction(cells, patients, failures, int(cells["in_training"].sum()), cfg, warnings, drift)


def _drift_check(model, info: dict, model_dir: Path, store: FeatureStore, cells: pd.DataFrame, settings: DriftConfig,
                 out: Path) -> tuple[Drift | None, str | None]:
    """These cells against the un-augmented cells of the cohorts the model trained on (not the cohorts its store
    holds for testing), written as drift.json and drift.png into ``out`` (with a cell-level model, their
    predicted class mix too); or why no check could run: the predictions stand either way."""
    training_store = Path(info["store"])
    if not training_store.exists():
        return None, (f"no drift check: the model's training store {training_store} is gone (moved or deleted); "
                      f"`aml-rapids drift REFERENCE_STORE {store.path}` compares these cells with another store")
    try:
        reference = FeatureStore.open(training_store)
        backbones = comparable_backbones(reference, store, list(info["backbones"]))
        mix = (None if info.get("level") == PATIENT_LEVEL else
               class_mix(model, info, model_dir, reference, store, settings, cells["predicted"].to_numpy()))
        drift = measure_drift(reference, store, settings, backbones, mix, training_cohorts(reference))
    except (ConfigError, DataError) as exc:  # a training store changed or damaged since the model was made
        return None, f"no drift check against the model's training store: {exc}"
    plot_drift(drift, out / "drift.png")
    write_drift(drift, out)  # last: a drift.json stands for a finished check
    return drift, None


def _cell_predictions(model, info: dict, store: FeatureStore, model_dir: Path, out: Path):
    """The stacking classifier's predictions.csv (per cell) and patients.csv (each patient's mean)."""
    proba, rows = predict_store(model, store, list(info["backbones"]), None, originals_only=True)
    classes = model.classes_
    cells = prediction_table(rows, proba, classes, ["cell_id", "path", "cohort", "patient", "label", "split"])
    cells["in_training"] = seen_in_training(rows, model_dir, info)
    with_patient = (rows["patient"] != "").to_numpy()
    means = patient_means(rows[with_patient], proba[with_patient], classes)
    patients = pd.DataFrame({"cohort": means["cohort"].to_numpy(), "patient": means["patient"].to_numpy(),
                             "n_cells": means["n_cells"].to_numpy(),
                             **{f"p_{c}": means[c].to_numpy() for c in classes}})
    patients["predicted"] = classes[means[list(classes)].to_numpy().argmax(axis=1)]
    cells.to_csv(out / "predictions.csv", index=False)
    patients.to_csv(out / "patients.csv", index=False)
    return cells, patients


def _unfinished(out: Path, source: Path) -> bool:
    """Whether ``out`` holds a prediction of these images that was interrupted: while extracting them (a store,
    no predictions yet), or after its predictions but before its run record (in the drift check). The same
    command then resumes it. Another source's unfinished store is refused."""
    if any(out.glob("runs/*-predict*.json")):
        return False  # finished
    store = out / "features.zarr"
    if not store.is_dir():  # predicted from a given store, interrupted after its predictions: done again
        if not (out / "predictions.csv").is_file() or not (out / SOURCE).is_file():
            return False
        made_from = (out / SOURCE).read_text()
        if made_from != str(Path(source).resolve()):
            raise OutputError(f"prediction folder {out} holds an unfinished prediction of {made_from}, not of "
                              f"{source}; use a new folder, or pass --overwrite to replace it")
        return True
    try:
        made_from = FeatureStore.open(store).meta["manifests"][0]["source"]
    except (DataError, KeyError, IndexError):
        return False  # not a store this command can resume; the fresh-folder check reports the folder
    if made_from != str(Path(source).resolve()):
        raise OutputError(f"prediction folder {out} holds an unfinished prediction of {made_from}, not of {source}; "
                          "use a new folder, or pass --overwrite to replace it")
    return True


def _write_failures(failures: list[Problem], out: Path) -> None:
    if failures:
        pd.DataFrame([(printable(p.path), p.reason) for p in failures], columns=["path", "reason"]).to_csv(
            out / FAILED, index=False)
