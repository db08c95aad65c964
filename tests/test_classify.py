"""The stacking classifier: no leakage into the meta-learner, metrics, and the train/evaluate commands."""

import copy
import json
import threading
from types import SimpleNamespace

import joblib
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import aml_rapids.classify.model as model_module
from aml_rapids.classify.data import fold_groups
from aml_rapids.classify.model import FeatureStackingClassifier
from aml_rapids.cli import app
from aml_rapids.data.synthetic import write_demo_dataset
from aml_rapids.errors import AmlRapidsError, ConfigError
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


def test_forest_limits_reach_the_trees_and_the_fit_says_where_its_time_went():
    X, y, cells = planted_copies()
    model = FeatureStackingClassifier(block_dims=(24,), pca_components=8, rf_trees=10, rf_max_depth=3,
                                      rf_max_samples=0.25, folds=3, backend="sklearn").fit(X, y, groups=cells)
    assert max(tree.get_depth() for tree in model.forest_.estimators_) <= 3
    assert model.forest_.max_samples == 0.25
    # each tree's bootstrap sample holds about a quarter of the rows (sampled with replacement: fewer distinct)
    assert all(tree.tree_.weighted_n_node_samples[0] == round(0.25 * len(X)) for tree in model.forest_.estimators_)
    assert set(model.fit_seconds_) == {"zscore+pca", "fold split", "base learner fits", "fold outputs", "meta fit"}
    assert set(model.learner_seconds_) == {"fold svm fit", "fold rf fit", "svm refit", "rf refit"}
    assert all(seconds > 0 for seconds in [*model.fit_seconds_.values(), *model.learner_seconds_.values()])


def test_base_learners_fitted_side_by_side_give_the_same_model(monkeypatch):
    fit_threads = []

    def recording(*args):
        fit_threads.append(threading.get_ident())
        return fit_learner(*args)

    fit_learner = model_module._fit_learner
    monkeypatch.setattr(model_module, "_fit_learner", recording)
    X, y, cells = planted_copies()
    kwargs = dict(block_dims=(24,), pca_components=8, rf_trees=20, folds=3, backend="sklearn")
    models = {}
    for jobs in (1, 3):
        fit_threads.clear()
        models[jobs] = FeatureStackingClassifier(n_jobs=jobs, **kwargs).fit(X, y, groups=cells)
        assert len(fit_threads) == 2 * (3 + 1)  # an SVM and a forest per fold, and the final pair
        if jobs == 1:
            assert set(fit_threads) == {threading.get_ident()}
        else:
            assert len(set(fit_threads)) > 1
    np.testing.assert_array_equal(models[1].oof_, models[3].oof_)
    np.testing.assert_array_equal(models[1].meta_.coef_, models[3].meta_.coef_)
    np.testing.assert_array_equal(models[1].predict_proba(X), models[3].predict_proba(X))


def test_each_svm_can_be_fitted_on_a_class_stratified_sample(monkeypatch):
    svm_rows = []

    def recording(estimator, Z, labels, rows, step):
        if "svm" in step:
            svm_rows.append((step, np.arange(len(labels)) if rows is None else np.asarray(rows), labels))
        return fit_learner(estimator, Z, labels, rows, step)

    fit_learner = model_module._fit_learner
    monkeypatch.setattr(model_module, "_fit_learner", recording)
    X, y, cells = planted_copies(n_cells=60, copies=4)
    model = FeatureStackingClassifier(block_dims=(24,), pca_components=8, rf_trees=10, folds=3, backend="sklearn",
                                      svm_max_rows=50).fit(X, y, groups=cells)
    assert len(svm_rows) == 4 and model.svm_.shape_fit_[0] == 50
    share = np.mean(y == "x")
    for step, rows, labels in svm_rows:
        assert len(rows) == 50 and len(np.unique(rows)) == 50
        assert abs(np.mean(labels[rows] == 0) - share) < 0.05  # each class in proportion
    sampled = [set(rows) for step, rows, _ in svm_rows if step == "fold svm fit"]
    trained = [set(train) for train, _ in model_module.grouped_folds(np.unique(y, return_inverse=True)[1], cells, 3, 0)]
    assert all(any(rows <= train for train in trained) for rows in sampled)  # a sample of its fold's rows only
    again = FeatureStackingClassifier(block_dims=(24,), pca_components=8, rf_trees=10, folds=3, backend="sklearn",
                                      svm_max_rows=50).fit(X, y, groups=cells)
    np.testing.assert_array_equal(model.predict_proba(X), again.predict_proba(X))  # seeded


def test_a_class_too_rare_for_its_share_of_an_svm_sample_keeps_a_row():
    X, y, cells = planted_copies(n_cells=60, copies=2)
    y = y.copy()
    y[:2] = "z"  # one cell's two copies: a class of 2 rows in 120
    model = FeatureStackingClassifier(block_dims=(24,), pca_components=8, rf_trees=10, folds=2, backend="sklearn",
                                      svm_max_rows=20).fit(X, y, groups=cells)
    assert "z" in model.classes_[model.svm_.classes_] and model.svm_.shape_fit_[0] == 21


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
    runner.invoke(app, ["demo-data", "-o", str(demo), "--patients", "3", "--cells", "12"])
    runner.invoke(app, ["index", str(demo), "-o", str(run)])
    assert runner.invoke(app, ["split", str(run / "manifest.parquet")]).exit_code == 0
    tiny = ["--set", "features.backbones=[{name: tiny, weights: none, engine: torch, precision: fp32}]", "--set", "loader.batch_size=16",
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
    assert report["split_protocol"] == "patient-grouped split" and report["backbones"]["tiny"]["pretrained"] is False
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
    by_hand = cells.groupby("patient")[list(prob.columns)].mean()
    assert np.allclose(patients.set_index("patient")[list(prob.columns)].loc[by_hand.index], by_hand)
    assert (patients["predicted"] == patients[list(prob.columns)].idxmax(axis=1).str[2:]).all()
    from_store = runner.invoke(app, ["predict", str(run / "model"), str(tmp_path / "pred" / "features.zarr"),
                                     "-o", str(tmp_path / "pred2")])
    assert from_store.exit_code == 0, from_store.output
    again = pd.read_csv(tmp_path / "pred2" / "predictions.csv")
    assert np.allclose(again.filter(like="p_").to_numpy(), prob.to_numpy())
    result = runner.invoke(app, ["evaluate", str(run / "model"), str(run / "features.zarr"), "--split", "train"])
    assert result.exit_code == 2 and "fitted on" in result.output
    info = json.loads((run / "model" / "model.json").read_text())
    assert {"base learner fits", "meta fit"} <= set(info["fit_seconds"]) and "rf refit" in info["learner_seconds"]
    (run / "model" / "model.json").write_text(json.dumps({**info, "aml_rapids": "0.0.1"}))
    result = runner.invoke(app, ["evaluate", str(run / "model"), str(run / "features.zarr")])
    assert result.exit_code == 3 and "retrain" in result.output


def test_fold_training_rows_never_include_the_held_out_fold():
    from aml_rapids.classify.crossval import training_positions
    from aml_rapids.config import load_config

    rows = pd.DataFrame({"label": ["a"] * 6 + ["b"] * 2, "fold": [0, 1, 2, 0, 1, 2, 0, 1]})
    train = np.flatnonzero(rows["fold"] != 2)
    picked = training_positions(rows, train, load_config(None))
    assert set(picked) <= set(train) and (rows["label"].iloc[picked].value_counts() == 4).all()
    assert list(training_positions(rows, train, load_config(None, ["oversample.enabled=false"]))) == list(train)


@pytest.mark.slow
def test_run_with_kfold_cross_validates_by_patient(tmp_path):
    demo, run = tmp_path / "demo", tmp_path / "run"
    runner.invoke(app, ["demo-data", "-o", str(demo), "--patients", "3", "--cells", "8"])
    settings = ["split.method=kfold", "split.folds=3", "features.backbones=[{name: tiny, weights: none, engine: torch, precision: fp32}]",
                "loader.batch_size=16", "features.chunk_batches=2", "loader.image_size=64", "loader.device=cpu",
                "features.store_dtype=float32", "classify.pca_components=8", "classify.rf_trees=20",
                "classify.folds=2", "classify.backend=sklearn"]
    result = runner.invoke(app, ["run", str(demo), "-o", str(run), *[a for s in settings for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "cv" / "metrics.json").read_text())
    oof = pd.read_csv(run / "cv" / "predictions.csv")
    assert report["split_protocol"] == "patient-grouped k-fold" and len(report["folds"]) == 3
    assert len(oof) == 120 and oof["cell_id"].is_unique  # every cell predicted once, by the fold that held it
    assert (oof.groupby("patient")["fold"].nunique() == 1).all()
    assert report["patient_level"]["n"] == 15 and sum(f["cells"] for f in report["folds"]) == 120
    assert {"roc.png", "roc_patients.png", "confusion.png"} <= {p.name for p in (run / "cv").iterdir()}
    result = runner.invoke(app, ["cv", str(tmp_path / "nostore")])
    assert result.exit_code != 0


class _FakeCuml:
    """Stands in for a fitted cuML estimator (none can run here): as_sklearn gives back the wrapped one."""

    def __init__(self, estimator, refuse: bool = False):
        self.estimator, self.refuse = estimator, refuse

    def as_sklearn(self):
        if self.refuse:
            raise NotImplementedError("Converting multiclass models from GPU is not yet supported")
        return self.estimator


def write_info(folder, **info):
    """A model.json as train writes it, naming the joblib files now in ``folder`` with their sha256."""
    from aml_rapids import __version__
    from aml_rapids.classify.io import INFO_FILE
    from aml_rapids.outputs import file_sha256

    files = {p.name: file_sha256(p) for p in folder.glob("*.joblib")}
    (folder / INFO_FILE).write_text(json.dumps({"aml_rapids": __version__, "backbones": {}, "classes": [],
                                                "feature_identity": {}, "files": files, **info}))


def test_the_ablation_leaves_out_a_learner_or_the_stacking(tmp_path):
    """Either learner alone (the meta-learner then calibrates it), or both averaged with equal weight, each
    calibrated by its own logistic regression on its out-of-fold outputs: by hand."""
    from aml_rapids.config import ClassifyConfig

    X, y, cells = planted_copies()
    kwargs = dict(block_dims=(24,), pca_components=8, rf_trees=10, folds=3, backend="sklearn")
    for alone in ("svm", "forest"):
        model = FeatureStackingClassifier(learners=(alone,), **kwargs).fit(X, y, groups=cells)
        assert (model.svm_ is None) == (alone == "forest") and (model.forest_ is None) == (alone == "svm")
        assert model.oof_.shape == (len(y), 2) and set(model.learner_seconds_) == (
            {"fold svm fit", "svm refit"} if alone == "svm" else {"fold rf fit", "rf refit"})
        assert np.allclose(model.predict_proba(X).sum(axis=1), 1)
    average = FeatureStackingClassifier(combine="average", **kwargs).fit(X, y, groups=cells)
    stacked = FeatureStackingClassifier(**kwargs).fit(X, y, groups=cells)
    assert np.array_equal(average.oof_, stacked.oof_) and len(average.meta_) == 2
    Z = average.transform(X)
    score = average.svm_.decision_function(Z)  # two classes: one score, as the columns -s, s
    outputs = np.column_stack([-score, score, average.forest_.predict_proba(Z)])
    inputs = (outputs - average.meta_center_) / average.meta_scale_
    by_hand = (average.meta_[0].predict_proba(inputs[:, :2]) + average.meta_[1].predict_proba(inputs[:, 2:])) / 2
    assert np.allclose(average.predict_proba(X), by_hand, atol=1e-6)
    assert not np.allclose(average.predict_proba(X), stacked.predict_proba(X))
    for fitted in (FeatureStackingClassifier(learners=("forest",), **kwargs).fit(X, y, groups=cells), average):
        gpu = FeatureStackingClassifier(**fitted.get_params())  # as cuML made it: converted learner by learner
        gpu.__dict__.update(fitted.__dict__, backend_="cuml", pcas_=[_FakeCuml(p) for p in fitted.pcas_],
                            svm_=None if fitted.svm_ is None else _FakeCuml(fitted.svm_), forest_=_FakeCuml(fitted.forest_),
                            meta_=[_FakeCuml(m) for m in fitted.meta_] if fitted.combine == "average"
                            else _FakeCuml(fitted.meta_))
        assert np.array_equal(gpu.to_sklearn().predict_proba(X), fitted.predict_proba(X))
    with pytest.raises(ValueError, match="names a learner twice"):
        ClassifyConfig(learners=("svm", "svm"))
    with pytest.raises(ValueError, match="needs two learners"):
        ClassifyConfig(learners=("forest",), combine="average")


def test_a_gpu_model_loads_on_a_cpu_through_its_scikit_learn_twin(tmp_path):
    from aml_rapids.classify.io import MODEL_FILE, PORTABLE_FILE, _save_portable, load_model

    X, y, cells = planted_copies()
    fitted = FeatureStackingClassifier(block_dims=(24,), pca_components=4, rf_trees=5, folds=2,
                                       backend="sklearn").fit(X, y, groups=cells)
    gpu = FeatureStackingClassifier(**fitted.get_params())
    gpu.__dict__.update(fitted.__dict__, backend_="cuml", pcas_=[_FakeCuml(p) for p in fitted.pcas_],
                        svm_=_FakeCuml(fitted.svm_), forest_=_FakeCuml(fitted.forest_), meta_=_FakeCuml(fitted.meta_))
    assert _save_portable(gpu, tmp_path) is True and (tmp_path / PORTABLE_FILE).is_file()
    (tmp_path / MODEL_FILE).write_text("a cuML model: cannot be unpickled without cuML")
    write_info(tmp_path, backend="cuml", portable=True)
    twin, _ = load_model(tmp_path)
    assert twin.backend_ == "sklearn" and np.array_equal(twin.predict_proba(X), fitted.predict_proba(X))

    gpu.svm_ = _FakeCuml(fitted.svm_, refuse=True)
    reason = _save_portable(gpu, tmp_path / "refused")
    assert "cannot convert" in reason and "multiclass" in reason
    assert not (tmp_path / "refused" / PORTABLE_FILE).exists()
    write_info(tmp_path, backend="cuml", portable=reason)
    with pytest.raises(AmlRapidsError, match="no scikit-learn twin.*multiclass"):
        load_model(tmp_path)


class _FakeCumlMulticlassSVC:
    """Stands in for cuML's multiclass SVC: scikit-learn's OneVsOneClassifier over two-class cuML SVCs, kept in
    ``_multiclass.multiclass_estimator``; cuML refuses to convert the whole."""

    def __init__(self, ovo):
        inner = copy.copy(ovo)
        inner.estimators_ = [_FakeCuml(pair) for pair in ovo.estimators_]
        self._multiclass = SimpleNamespace(multiclass_estimator=inner)

    def as_sklearn(self):
        raise NotImplementedError("Converting multiclass models from GPU is not yet supported")


def test_a_multiclass_gpu_svm_is_converted_pair_by_pair(tmp_path):
    from sklearn.multiclass import OneVsOneClassifier
    from sklearn.svm import SVC

    rng = np.random.default_rng(0)
    y = rng.choice(["a", "b", "c", "d"], 240)
    X = rng.normal(0, 1, (240, 24)) + 2 * (y[:, None] == np.array(["a", "b", "c", "d"])).repeat(6, axis=1)
    fitted = FeatureStackingClassifier(block_dims=(24,), pca_components=8, rf_trees=5, folds=2,
                                       backend="sklearn").fit(X, y)
    codes = np.unique(y, return_inverse=True)[1]
    reference = copy.copy(fitted)  # the model as cuML trains it: one-vs-one over two-class SVMs
    Z = fitted._reduce(fitted._backend(), X, fit=False)
    reference.svm_ = OneVsOneClassifier(SVC(kernel="rbf", gamma="scale")).fit(Z, codes)
    gpu = copy.copy(reference)
    gpu.__dict__.update(backend_="cuml", pcas_=[_FakeCuml(p) for p in fitted.pcas_], forest_=_FakeCuml(fitted.forest_),
                        meta_=_FakeCuml(fitted.meta_), svm_=_FakeCumlMulticlassSVC(reference.svm_))
    joblib.dump(gpu.to_sklearn(), tmp_path / "twin.joblib")
    twin = joblib.load(tmp_path / "twin.joblib")
    assert isinstance(twin.svm_, OneVsOneClassifier) and isinstance(twin.svm_.estimator, SVC)
    assert np.array_equal(twin.predict_proba(X), reference.predict_proba(X))


@pytest.mark.slow
def test_training_streams_features_that_exceed_the_memory_budget(tmp_path, monkeypatch):
    from aml_rapids.classify import train as train_module
    from aml_rapids.config import load_config
    from aml_rapids.features.store import FeatureStore

    demo, run = tmp_path / "demo", tmp_path / "run"
    write_demo_dataset(demo, patients_per_class=3, cells_per_patient=12)
    runner.invoke(app, ["index", str(demo), "-o", str(run)])
    runner.invoke(app, ["split", str(run / "manifest.parquet")])
    settings = ["features.backbones=[{name: tiny, weights: none, engine: torch, precision: fp32}]", "loader.batch_size=16", "features.chunk_batches=1",
                "loader.image_size=64", "loader.device=cpu", "features.store_dtype=float32"]
    result = runner.invoke(app, ["extract", str(run / "manifest.parquet"), *[a for s in settings for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    small = ["classify.pca_components=8", "classify.rf_trees=20", "classify.folds=3", "classify.backend=sklearn"]
    seen, blocks = [], train_module.feature_blocks

    def spy(*args, **kwargs):
        for block in blocks(*args, **kwargs):
            seen.append(len(block))
            yield block

    monkeypatch.setattr(train_module, "feature_blocks", spy)
    streamed = train_module.train(run / "features.zarr", load_config(None, small + ["classify.memory_gb=1e-6"]),
                                  run / "streamed")
    monkeypatch.undo()
    in_memory = train_module.train(run / "features.zarr", load_config(None, small), run / "in_memory")
    assert streamed["reduction"].startswith("incremental") and in_memory["reduction"] == "PCA in memory"
    assert sum(seen) == 2 * streamed["training_rows"] and max(seen) <= 16 * 8 + 8  # two passes, 8 chunks at a time
    store = FeatureStore.open(run / "features.zarr")
    from aml_rapids.classify.io import load_model
    predictions = [train_module.predict_store(load_model(run / f)[0], store, ["tiny"], ("test",))[0]
                   for f in ("streamed", "in_memory")]
    assert (predictions[0].argmax(1) == predictions[1].argmax(1)).mean() >= 0.9


def small_store(path, rows=64, dim=6, chunk_rows=16):
    """A feature store written directly (no extraction): two classes, random features, all rows training."""
    from aml_rapids.features.plan import ROW_FIELDS, STATUS_OK
    from aml_rapids.features.store import FeatureStore

    table = pd.DataFrame({"cell_id": [f"c{i}" for i in range(rows)], "path": "", "label": ["x", "y"] * (rows // 2),
                          "patient": "", "cohort": "", "split": "train", "sha256": "", "pixels_sha256": "",
                          "aug_index": 0, "fold": -1, "augment": False, "status": STATUS_OK, "finetune_seen": False})[list(ROW_FIELDS)]
    store = FeatureStore.create(path, table, {"tiny": dim}, {"chunk_rows": chunk_rows, "store_dtype": "float32",
                                                           "backbones": {"tiny": {"dim": dim, "weights": "none",
                                                                                  "pretrained": False}}})
    values = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    for k in range(store.n_chunks):
        store.write_chunk(k, {"tiny": values[store.chunk_slice(k)]}, table["status"].to_numpy()[store.chunk_slice(k)])
    return store


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_features_with_nan_or_inf_are_refused_naming_the_rows(tmp_path, bad):
    from aml_rapids.classify.train import train
    from aml_rapids.config import load_config

    store = small_store(tmp_path / "s.zarr")
    store.group["features/tiny"][37, 2] = bad
    with pytest.raises(AmlRapidsError, match=r"1 rows of features \(rows 0-63\) hold NaN or Inf"):
        train(tmp_path / "s.zarr", load_config(None, ["classify.backend=sklearn"]), tmp_path / "m")
    with pytest.raises(AmlRapidsError, match="no features for backbone 'vgg16'"):
        train(tmp_path / "s.zarr", load_config(None, ["classify.backend=sklearn"]), tmp_path / "m", ["vgg16"])


def test_feature_blocks_merge_a_short_block_into_its_neighbour(tmp_path):
    from aml_rapids.classify.data import feature_blocks

    store = small_store(tmp_path / "s.zarr", rows=80, chunk_rows=16)
    keep = np.ones(80, dtype=bool)
    assert [len(b) for b in feature_blocks(store, ["tiny"], keep, chunks_per_block=2)] == [32, 32, 16]
    assert [len(b) for b in feature_blocks(store, ["tiny"], keep, min_rows=20, chunks_per_block=2)] == [32, 48]
    keep[:30] = False  # the first block keeps 2 rows: too few on its own
    assert [len(b) for b in feature_blocks(store, ["tiny"], keep, min_rows=20, chunks_per_block=2)] == [50]  # ... and so does the last


def test_pca_by_variance_share_and_over_concatenated_backbones():
    rng = np.random.default_rng(0)
    y = rng.choice(["x", "y"], 120)
    X = np.hstack([rng.normal(size=(120, 3)) @ rng.normal(size=(3, 20)), rng.normal(size=(120, 10))])  # rank 3 | 10
    X += rng.normal(0, 1e-3, X.shape)
    common = dict(block_dims=(20, 10), rf_trees=5, folds=2, backend="sklearn")
    share = FeatureStackingClassifier(pca_components=0.99, **common).fit(X, y)
    assert share.kept_[0] <= 3 and share.kept_[1] >= 9  # a rank-3 block needs 3 components, white noise nearly all
    assert share._reduce(share._backend(), X, fit=False).shape[1] == sum(share.kept_)
    joint = FeatureStackingClassifier(pca_components=6, pca_mode="concatenated", **common).fit(X, y)
    assert len(joint.pcas_) == 1 and joint.pcas_[0].n_features_in_ == 30 and joint.kept_ == [6]


def test_the_ablation_can_leave_out_the_z_score_and_the_pca():
    rng = np.random.default_rng(1)
    y = rng.choice(["x", "y"], 80)
    X = rng.normal(size=(80, 12)) * 50 + 7 + (y == "x")[:, None] * 3.0  # far from zero mean, unit spread
    common = dict(block_dims=(12,), rf_trees=5, folds=2, backend="sklearn")
    whole = FeatureStackingClassifier(pca_components=None, zscore=False, **common).fit(X, y)
    assert whole.pcas_ == [] and np.array_equal(whole._reduce(whole._backend(), X, fit=False), X.astype(np.float32))
    scored = FeatureStackingClassifier(pca_components=None, **common).fit(X, y)
    Z = scored._reduce(scored._backend(), X, fit=False)
    assert Z.shape == X.shape and np.allclose(Z.mean(axis=1), 0, atol=1e-5) and np.allclose(Z.std(axis=1), 1, atol=1e-4)
    assert whole.predict(X).shape == (80,)
    with pytest.raises(ConfigError, match="without PCA"):
        FeatureStackingClassifier(pca_components=None, **common).fit_streaming(lambda: iter([X]), y)


def test_oversampled_copies_can_be_left_out_of_a_selection(tmp_path):
    from aml_rapids.classify.data import select_rows

    store = small_store(tmp_path / "s.zarr")
    store.group["rows/aug_index"][10:20] = 1
    keep, rows = select_rows(store, ("train",), originals_only=True)
    assert keep.sum() == len(rows) == 54 and (rows["aug_index"] == 0).all()
    assert select_rows(store, ("train",))[0].sum() == 64


def test_a_corrupt_model_file_is_named(tmp_path):
    from aml_rapids.classify.io import MODEL_FILE, load_model

    (tmp_path / MODEL_FILE).write_bytes(b"\x80\x04 truncated")
    write_info(tmp_path, backend="sklearn", portable=True)
    with pytest.raises(AmlRapidsError, match=f"cannot load {tmp_path / MODEL_FILE}: .*retrain it"):
        load_model(tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"\x80\x04 another pickle")  # not the file model.json names
    with pytest.raises(AmlRapidsError, match=f"{tmp_path / MODEL_FILE} is not the file model.json was written "
                                             "with .*pickle, so it is not loaded"):
        load_model(tmp_path)


@pytest.mark.parametrize("mixed", [False, True])
def test_grouped_folds_keep_groups_whole_and_classes_balanced(mixed):
    from aml_rapids.classify.model import grouped_folds

    rng = np.random.default_rng(0)
    groups = rng.integers(0, 300, 3000)
    codes = groups % 3  # one class per group, as a cell and its copies, or a patient
    if mixed:
        codes = codes.copy()
        codes[:5] = (codes[:5] + 1) % 3  # a few groups now hold two classes: scikit-learn's search decides
    folds = grouped_folds(codes, groups, 5, seed=0)
    held = np.concatenate([h for _, h in folds])
    assert np.array_equal(np.sort(held), np.arange(3000))  # every row held out exactly once
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        shares = np.bincount(codes[test], minlength=3) / len(test)
        assert np.all(np.abs(shares - 1 / 3) < 0.06)
    assert [len(h) for _, h in grouped_folds(codes, groups, 5, seed=0)] == [len(h) for _, h in folds]


def test_too_few_groups_for_the_folds_is_a_clear_error():
    from aml_rapids.classify.model import grouped_folds

    with pytest.raises(AmlRapidsError, match="5 grouped stacking folds from 4 groups.*lower classify.folds"):
        grouped_folds(np.array([0, 0, 1, 1, 1, 0]), np.array(["a", "a", "b", "b", "c", "d"]), 5, seed=0)


def test_grouped_folds_without_groups_are_stratified_row_folds():
    from aml_rapids.classify.model import grouped_folds

    codes = np.repeat([0, 1], [900, 100])
    folds = grouped_folds(codes, None, 5, seed=0)
    assert all(np.bincount(codes[h]).tolist() == [180, 20] for _, h in folds)


def test_bootstrap_resamples_within_each_class():
    """A perfect classifier's macro F1 is 1 in every resample that holds every class; resampling across classes
    drew resamples without one and scored its F1 as 0, pulling the interval below the estimate."""
    from aml_rapids.evaluate.metrics import bootstrap

    classes = np.array(["a", "b", "c", "d"])
    y = np.repeat(classes, 2)  # an unstratified resample of 8 misses some class about a third of the time
    proba = (y[:, None] == classes[None, :]).astype(float)
    assert bootstrap(y, proba, classes, n=200)["macro_f1"] == [1.0, 1.0]
    patients = np.array([f"p{i}" for i in range(8)])  # two patients a class
    assert bootstrap(y, proba, classes, patients, n=200)["macro_f1"] == [1.0, 1.0]
    y, proba = np.repeat(classes, 10), np.repeat(proba, 5, axis=0)
    noisy = proba + np.random.default_rng(0).normal(0, 0.6, proba.shape)
    low, high = bootstrap(y, noisy, classes, n=300)["accuracy"]
    assert low < summary(y, noisy, classes)["accuracy"] < high
