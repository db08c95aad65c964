"""The stacking classifier: no leakage into the meta-learner, metrics, and the train/evaluate commands."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from aml_rapids.classify.data import fold_groups
from aml_rapids.classify.model import FeatureStackingClassifier
from aml_rapids.cli import app
from aml_rapids.data.synthetic import write_demo_dataset
from aml_rapids.errors import AmlRapidsError
from aml_rapids.evaluate.metrics import per_class, summary

runner = CliRunner()


def planted_copies(n_cells=60, copies=4, seed=0):
    """Cells with random labels and their own feature signature, each present ``copies`` times (as
    oversampling makes them): only memorising a cell predicts its copies."""
    rng = np.random.default_rng(seed)
    signature = rng.normal(0, 1, (n_cells, 24))
    labels = rng.choice(["x", "y"], n_cells)
    X = np.repeat(signature, copies, axis=0) + rng.normal(0, 0.01, (n_cells * copies, 24))
    return X, np.repeat(labels, copies), np.repeat(np.arange(n_cells), copies)


def oof_forest_accuracy(model, y):
    forest = model.oof_[:, -len(model.classes_):]
    return float((model.classes_[forest.argmax(axis=1)] == y).mean())


def test_meta_learner_sees_only_out_of_group_outputs():
    X, y, cells = planted_copies()
    kwargs = dict(block_dims=(24,), pca_components=8, rf_trees=30, folds=4, backend="sklearn")
    grouped = FeatureStackingClassifier(**kwargs).fit(X, y, groups=cells)
    leaky = FeatureStackingClassifier(**kwargs).fit(X, y)  # every row its own group: copies leak across folds
    assert oof_forest_accuracy(leaky, y) > 0.9  # the planted case does leak when folds ignore cells
    assert oof_forest_accuracy(grouped, y) < 0.7  # grouped folds: the forest's outputs are at chance


def test_fold_groups_prefer_patients():
    rows = pd.DataFrame({"patient": ["p1", "p1", "p2"], "cell_id": ["a", "b", "c"]})
    assert list(fold_groups(rows)) == ["p1", "p1", "p2"]
    assert list(fold_groups(rows.assign(patient=""))) == ["a", "b", "c"]


def test_single_class_and_wrong_width_are_refused():
    X, y, _ = planted_copies()
    with pytest.raises(AmlRapidsError, match="single class"):
        FeatureStackingClassifier(block_dims=(24,), backend="sklearn").fit(X, np.full(len(y), "x"))
    model = FeatureStackingClassifier(block_dims=(24,), pca_components=4, rf_trees=5, folds=2, backend="sklearn")
    model.fit(X, y, groups=np.arange(len(y)) // 4)
    with pytest.raises(AmlRapidsError, match="features have 10 columns, the model expects 24"):
        model.predict(X[:, :10])


def test_per_class_metrics_by_hand():
    y = np.array(["a", "a", "b", "b", "c"])
    pred = np.array(["a", "b", "b", "b", "a"])
    m = per_class(y, pred, np.array(["a", "b", "c"]))
    assert m["a"]["precision"] == 0.5 and m["a"]["sensitivity"] == 0.5 and m["a"]["specificity"] == 2 / 3
    assert m["b"]["precision"] == 2 / 3 and m["b"]["sensitivity"] == 1.0 and m["c"]["f1"] == 0.0
    assert m["a"]["accuracy_ovr"] == 3 / 5
    proba = np.eye(3)[[0, 1, 1, 1, 0]]
    s = summary(y, proba, np.array(["a", "b", "c"]))
    assert s["accuracy"] == 3 / 5 and s["confusion"]["matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


@pytest.mark.slow
def test_train_and_evaluate_commands_on_a_synthetic_store(tmp_path):
    demo, run = tmp_path / "demo", tmp_path / "run"
    runner.invoke(app, ["demo-data", str(demo), "--patients", "3", "--cells", "12"])
    runner.invoke(app, ["index", str(demo), "-o", str(run)])
    assert runner.invoke(app, ["split", str(run / "manifest.parquet")]).exit_code == 0
    tiny = ["--set", "features.backbones=[{name: tiny, weights: none}]", "--set", "loader.batch_size=16",
            "--set", "features.chunk_batches=2", "--set", "loader.image_size=64", "--set", "loader.device=cpu",
            "--set", "features.store_dtype=float32"]
    assert runner.invoke(app, ["extract", str(run / "manifest.parquet"), *tiny]).exit_code == 0
    small = ["--set", "classify.pca_components=8", "--set", "classify.rf_trees=20", "--set", "classify.folds=3"]
    result = runner.invoke(app, ["train", str(run / "features.zarr"), "-o", str(run / "model"), "--backend",
                                 "sklearn", *small])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(run / "model"), str(run / "features.zarr")])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "model" / "eval-test" / "metrics.json").read_text())
    assert report["split_protocol"] == "patient-level" and report["backbones"]["tiny"]["pretrained"] is False
    assert report["cell_level"]["n"] == 60 and report["patient_level"]["n"] == 5
    low, high = report["cell_level"]["ci95"]["accuracy"]
    assert low <= report["cell_level"]["accuracy"] <= high
    assert {p.name for p in (run / "model" / "eval-test").iterdir()} >= {"metrics.json", "confusion.png", "roc.png",
                                                                        "roc_patients.png"}
    write_demo_dataset(tmp_path / "new", patients_per_class=1, cells_per_patient=4, seed=9)
    result = runner.invoke(app, ["predict", str(run / "model"), str(tmp_path / "new"), "-o", str(tmp_path / "pred")])
    assert result.exit_code == 0, result.output
    cells = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    patients = pd.read_csv(tmp_path / "pred" / "patients.csv")
    assert len(cells) == 20 and len(patients) == 5 and set(patients["n_cells"]) == {4}
    prob = cells.filter(like="p_")
    assert prob.shape[1] == 5 and np.allclose(prob.sum(axis=1), 1, atol=1e-4)
    from_store = runner.invoke(app, ["predict", str(run / "model"), str(tmp_path / "pred" / "features.zarr"),
                                     "-o", str(tmp_path / "pred2")])
    assert from_store.exit_code == 0, from_store.output
    again = pd.read_csv(tmp_path / "pred2" / "predictions.csv")
    assert np.allclose(again.filter(like="p_").to_numpy(), prob.to_numpy())
    result = runner.invoke(app, ["evaluate", str(run / "model"), str(run / "features.zarr"), "--split", "train"])
    assert result.exit_code == 1 and "fitted on" in result.output
    info = json.loads((run / "model" / "model.json").read_text())
    (run / "model" / "model.json").write_text(json.dumps({**info, "aml_rapids": "0.0.1"}))
    result = runner.invoke(app, ["evaluate", str(run / "model"), str(run / "features.zarr")])
    assert result.exit_code == 1 and "retrain" in result.output
