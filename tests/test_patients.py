"""Patient-level models: bags read from the store, attention MIL against pooled cell scores, the commands."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from aml_rapids.cli import app
from aml_rapids.config import PatientsConfig
from aml_rapids.errors import ConfigError, DataError
from aml_rapids.features.plan import ROW_FIELDS, STATUS_FAILED, STATUS_OK, STATUS_PADDING, pad_segments
from aml_rapids.features.store import FeatureStore
from aml_rapids.patients.bags import Bags, read_bags
from aml_rapids.patients.model import PatientMILClassifier

runner = CliRunner()
DIM = 32


def write_store(path, rows: pd.DataFrame, X: np.ndarray, chunk_rows: int = 64) -> FeatureStore:
    """A feature store written directly (no extraction), with the identity a model folder records."""
    defaults = {"path": "", "cohort": "c", "split": "train", "pixels_sha256": "", "aug_index": 0, "fold": -1,
                "augment": False, "status": STATUS_OK, "finetune_seen": False}
    table = rows.assign(**{k: v for k, v in defaults.items() if k not in rows})
    table = table.assign(cell_id=[f"cell{i:05d}" for i in range(len(table))]) if "cell_id" not in table else table
    table = table.assign(sha256=table["cell_id"]) if "sha256" not in table else table
    table = table.assign(path=table["patient"] + "/" + table["cell_id"] + ".tif")[list(ROW_FIELDS)]
    order = np.argsort(table["split"].to_numpy(), kind="stable")  # one segment per split, each closed by padding
    table = pad_segments(table.iloc[order].reset_index(drop=True), chunk_rows)
    features = np.zeros((len(table), X.shape[1]))
    features[(table["status"] != STATUS_PADDING).to_numpy()] = X[order]
    meta = {"chunk_rows": chunk_rows, "store_dtype": "float32", "features_seed": 0,
            "preprocess": {"image_size": 16, "segmentation": {"enabled": False}},
            "backbones": {"tiny": {"dim": X.shape[1], "weights": "none", "pretrained": False, "sha256": None}}}
    store = FeatureStore.create(path, table, {"tiny": X.shape[1]}, meta)
    status = table["status"].to_numpy()
    for k in range(store.n_chunks):
        span = store.chunk_slice(k)
        store.write_chunk(k, {"tiny": features[span].astype(np.float32)}, status[span])
    return store


def planted(patients=60, cells=50, planted_cells=4, offset=0.3, shift=6.0, seed=0):
    """Two classes whose cells are drawn alike (each patient with its own shift, as stain and smear give), but
    every ``pos`` patient has ``planted_cells`` cells moved along one direction: only those tell the classes apart."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(0, 1, DIM)
    signal /= np.linalg.norm(signal)
    parts, features = [], []
    for p in range(patients):
        label = "pos" if p % 2 else "neg"
        x = rng.normal(0, 1, (cells, DIM)) + rng.normal(0, offset, DIM)
        marked = np.zeros(cells, dtype=bool)
        if label == "pos":
            marked[rng.choice(cells, planted_cells, replace=False)] = True
            x[marked] += shift * signal
        features.append(x)
        parts.append(pd.DataFrame({"patient": f"p{p:02d}", "label": label, "fold": (p // 2) % 5,
                                   "cell_id": [f"p{p:02d}-{'planted' if m else 'plain'}-{i:03d}"
                                               for i, m in enumerate(marked)]}))
    return pd.concat(parts, ignore_index=True), np.concatenate(features)


def test_bags_hold_one_patient_each_whatever_the_row_order(tmp_path):
    rng = np.random.default_rng(1)
    rows = pd.DataFrame({"patient": rng.choice([f"q{i}" for i in range(7)], 300), "cohort": "c"})
    rows["cohort"] = np.where(rows["patient"] == "q0", rng.choice(["c", "d"], 300), "c")  # q0 in two cohorts
    rows["label"] = rows["patient"].map(lambda p: "a" if int(p[1]) % 2 else "b")
    rows["cell_id"] = [f"x{i}" for i in range(300)]
    rows["sha256"] = rows["cell_id"]
    rows.loc[10, "sha256"] = rows["sha256"][rows["patient"] == rows.loc[10, "patient"]].iloc[0]  # a copy
    rows["aug_index"] = np.where(np.arange(300) % 25 == 24, 1, 0)
    X = np.column_stack([np.arange(300), rng.normal(size=(300, 3))])  # column 0: the row it came from
    store = write_store(tmp_path / "s.zarr", rows, X, chunk_rows=32)
    bags = read_bags(store, ["tiny"], None)
    keys = (rows["cohort"] + "/" + rows["patient"]).to_numpy()
    assert len(bags) == len(set(keys)) == 8
    for i in range(len(bags)):
        origin = bags.X[bags.cells(i), 0].astype(int)
        assert set(keys[origin]) == {bags.keys[i]} and (bags.rows["key"].iloc[bags.cells(i)] == bags.keys[i]).all()
        assert (rows["cell_id"].to_numpy()[origin] == bags.rows["cell_id"].iloc[bags.cells(i)]).all()
    copies = int(10 % 25 != 24 and rows.loc[10, "sha256"] != rows.loc[10, "cell_id"])
    assert bags.left_out == {"augmented copies": 12, "same content within a patient": copies}
    assert bags.sizes.sum() == 300 - 12 - copies
    assert read_bags(store, ["tiny"], None, include_augmented=True, dedupe=False).sizes.sum() == 300


def test_bad_bags_are_refused_naming_the_problem(tmp_path):
    rows = pd.DataFrame({"patient": ["p1"] * 4 + ["p2"] * 4, "label": ["a"] * 4 + ["b"] * 4})
    nameless = write_store(tmp_path / "nameless.zarr", rows.assign(patient=["p1"] * 4 + [""] * 4), np.ones((8, 3)))
    with pytest.raises(DataError, match="4 of 8 cells have no patient"):
        read_bags(nameless, ["tiny"], None)
    failed = write_store(tmp_path / "failed.zarr", rows.assign(status=[STATUS_OK] * 4 + [STATUS_FAILED] * 4),
                         np.ones((8, 3)))
    with pytest.raises(DataError, match="no usable cell.*c/p2"):
        read_bags(failed, ["tiny"], None)
    mixed = write_store(tmp_path / "mixed.zarr", rows.assign(label=list("aaabbbbb")), np.ones((8, 3)))
    with pytest.raises(DataError, match="patient c/p1 has cells of 2 classes"):
        read_bags(mixed, ["tiny"], None)
    bags = read_bags(write_store(tmp_path / "ok.zarr", rows, np.random.default_rng(0).normal(size=(8, 3))),
                     ["tiny"], None)
    with pytest.raises(DataError, match="class a has 1 training patient"):
        PatientMILClassifier(block_dims=(3,), epochs=1).fit(bags)
    other = read_bags(write_store(tmp_path / "other.zarr", rows.assign(label=["a"] * 4 + ["z"] * 4),
                                  np.ones((8, 3))), ["tiny"], None)
    with pytest.raises(DataError, match="validation patients of class\\(es\\) z, which no training patient has"):
        PatientMILClassifier(block_dims=(3,), epochs=1).fit(bags.subset(np.array([0, 1, 0, 1])), other)
    big = bags.subset(np.array([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match=r"4 bag\(s\) of up to 4 cells; patient c/p1 has 4\), over.*lower patients.batch_patients"):
        PatientMILClassifier(block_dims=(3,), epochs=1, memory_gb=1e-9).fit(big, bags)


def test_a_class_with_fewer_patients_than_folds_is_refused(tmp_path):
    rows = pd.DataFrame({"patient": [f"p{i}" for i in range(6)], "label": list("aaaabb"), "fold": [0, 1, 2, 0, 1, 2]})
    write_store(tmp_path / "s.zarr", rows, np.random.default_rng(0).normal(size=(6, 3)))
    result = runner.invoke(app, ["cv", str(tmp_path / "s.zarr"), "--level", "patient", "-o", str(tmp_path / "cv")])
    assert result.exit_code == 3 and "class b has patients in only 2 of the 3 folds" in result.output
    split = pd.DataFrame({"patient": ["p0", "p0", "p1", "p1"], "label": list("aabb"), "fold": [0, 1, 1, 1]})
    write_store(tmp_path / "split.zarr", split, np.random.default_rng(0).normal(size=(4, 3)))
    result = runner.invoke(app, ["cv", str(tmp_path / "split.zarr"), "--level", "patient", "-o", str(tmp_path / "c2")])
    assert result.exit_code == 3 and "patient c/p0 has cells in 2 folds" in result.output


@pytest.mark.slow
def test_attention_finds_the_few_cells_the_mean_misses(tmp_path):
    """The planted case, through `cv --level patient`: the stacking classifier's cell scores pooled by their mean
    hardly rank the patients, attention MIL does, and the cells it attends to most are the planted ones."""
    rows, X = planted()
    write_store(tmp_path / "planted.zarr", rows, X)
    small = ["classify.pca_components=32", "classify.rf_trees=20", "classify.folds=3", "classify.backend=sklearn",
             "patients.pca_components=32", "patients.ensemble=2", "patients.epochs=40", "patients.patience=10",
             "evaluate.bootstrap_samples=200"]
    result = runner.invoke(app, ["cv", str(tmp_path / "planted.zarr"), "--level", "patient", "-o", str(tmp_path / "cv"),
                                 *[a for s in small for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cv" / "metrics.json").read_text())
    auc = {name: m["macro_auc"] for name, m in report["models"].items()}
    mil, mean = auc["attention MIL"], auc["mean of cell probabilities"]
    assert mil >= 0.95 and mil - mean >= 0.1 and report["models"]["attention MIL"]["ci95"]["macro_auc"][0] > mean
    assert report["bags"] == {"patients": 60, "cells": 3000, "left_out": {"augmented copies": 0,
                                                                          "same content within a patient": 0}}
    mcnemar = report["mcnemar_vs_attention_mil"]["mean of cell probabilities"]
    assert mcnemar["b"] > mcnemar["c"]  # patients only attention MIL gets right outnumber the others
    attention = pd.read_csv(tmp_path / "cv" / "attention.csv")
    assert np.allclose(attention.groupby("patient")["attention"].sum(), 1, atol=1e-4)
    positives = attention[attention["label"] == "pos"]
    top = positives.sort_values("attention", ascending=False).groupby("patient").head(4)
    assert top["cell_id"].str.contains("planted").mean() >= 0.7  # chance: 4 of 50 cells
    patients = pd.read_csv(tmp_path / "cv" / "patients.csv").set_index("patient")
    assert len(patients) == 60 and (patients["fold"] == rows.groupby("patient")["fold"].first()).all()
    from aml_rapids.report.render import render_report

    page = render_report(tmp_path).read_text()
    assert "Patients, attention MIL (n = 60)" in page and "Patients, mean of cell probabilities" in page


@pytest.mark.slow
def test_train_evaluate_and_predict_at_patient_level(tmp_path):
    rows, X = planted(patients=40, cells=30)
    rows["split"] = np.select([rows["fold"] == 0, rows["fold"] == 1], ["test", "val"], "train")
    write_store(tmp_path / "s.zarr", rows, X)
    small = ["--set", "patients.pca_components=32", "--set", "patients.epochs=30", "--set", "patients.ensemble=2"]
    result = runner.invoke(app, ["train", str(tmp_path / "s.zarr"), "--level", "patient", "-o", str(tmp_path / "m"),
                                 *small])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    assert info["level"] == "patient" and info["validation"] == "the store's val split"
    assert info["training_patients"] == 24 and info["validation_patients"] == 8 and info["training_rows"] == 960
    assert len(info["members"]) == 2 and {m["validation_patients"] for m in info["members"]} == {8}
    assert all(1 <= m["best_epoch"] <= m["epochs_run"] <= 30 for m in info["members"])
    result = runner.invoke(app, ["evaluate", str(tmp_path / "m"), str(tmp_path / "s.zarr")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m" / "eval-test" / "metrics.json").read_text())
    assert report["level"] == "patient" and report["patient_level"]["n"] == 8 and "cell_level" not in report
    assert {"roc_patients.png", "confusion_patients.png", "patients.csv", "predictions.csv"} <= {
        p.name for p in (tmp_path / "m" / "eval-test").iterdir()}
    for split in ("val", "train"):  # early stopping read the val patients: they count as seen
        result = runner.invoke(app, ["evaluate", str(tmp_path / "m"), str(tmp_path / "s.zarr"), "--split", split])
        assert result.exit_code == 2, result.output
    result = runner.invoke(app, ["predict", str(tmp_path / "m"), str(tmp_path / "s.zarr"), "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    cells = pd.read_csv(tmp_path / "p" / "predictions.csv")
    patients = pd.read_csv(tmp_path / "p" / "patients.csv")
    assert len(cells) == 1200 and len(patients) == 40 and cells["in_training"].sum() == 960
    first = patients.iloc[0]
    mine = cells[cells["patient"] == first["patient"]].sort_values("attention_rank")
    assert first["top_cells"].split() == mine["cell_id"].head(8).tolist()
    assert (mine["attention"].diff().dropna() <= 0).all() and np.isclose(mine["attention"].sum(), 1, atol=1e-4)
    assert (mine["predicted"] == first["predicted"]).all()


def test_patient_options_reach_the_model():
    options = PatientsConfig(attention="per_class", hidden=8, max_cells=None)
    from aml_rapids.patients.train import new_model

    model = new_model((5, 7), options)
    assert (model.attention, model.hidden, model.max_cells, model.block_dims) == ("per_class", 8, None, (5, 7))


def test_per_class_attention_on_three_classes_gives_each_class_its_own_weights():
    rng = np.random.default_rng(0)
    sizes = rng.integers(3, 9, 12)  # bags of unequal size: padding and masks at work
    labels = np.array(["a", "b", "c"] * 4)
    rows = pd.DataFrame({"key": np.repeat([f"c/p{i}" for i in range(12)], sizes),
                         "label": np.repeat(labels, sizes)})
    bags = Bags(rows, rng.normal(size=(sizes.sum(), 6)).astype(np.float32), np.array([f"c/p{i}" for i in range(12)]),
                labels, np.concatenate([[0], np.cumsum(sizes)]))
    model = PatientMILClassifier(block_dims=(6,), attention="per_class", pca_components=4, epochs=2, ensemble=2,
                                 batch_patients=3, max_cells=4).fit(bags)
    proba, attention = model.outputs(bags)
    assert proba.shape == (12, 3) and np.allclose(proba.sum(axis=1), 1) and attention.shape == (sizes.sum(), 3)
    per_bag = np.add.reduceat(attention, bags.offsets[:-1], axis=0)
    assert np.allclose(per_bag, 1, atol=1e-5)  # each class's attention sums to 1 over each bag
    assert not np.allclose(attention[:, 0], attention[:, 1])
