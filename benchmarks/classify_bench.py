"""Classifier stage on synthetic features shaped like the store's (rows x [1280, 2048, 4096]): each step on
its own (row z-score + PCA, SVM fit, forest fit), the whole stacking fit for each fold count asked for, and
predict, for every available backend in the same run; scikit-learn on this machine's cores is the baseline. A
stacking fit runs its independent base-learner fits on threads (``n_jobs``): scikit-learn's on every core, cuML's
4 at once by default (per-thread CUDA streams) and, timed beside it at the full row count, with each of
``CUML_THREADS`` at once.

scikit-learn's RBF SVM grows quadratically with rows, so on a GPU machine the baseline may be measured on fewer
rows (``baseline_rows``) than cuML; ratios only compare the two at the same row count. The features are drawn
so that classes overlap (held-out accuracy well below 1), and both backends' models, fitted on the same rows,
predict the same held-out rows: the share on which they agree is recorded, next to the share on which two
scikit-learn models differing only in their seed agree (what agreement to expect from equivalent models). A cuML
model and its own scikit-learn twin (``to_sklearn``, the model a CPU loads) must agree on nearly every row: that
share is recorded too."""

from __future__ import annotations

import time
import traceback

import numpy as np

from aml_rapids.classify.backend import get_backend
from aml_rapids.classify.model import FeatureStackingClassifier
from aml_rapids.errors import AmlRapidsError

DIMS = (1280, 2048, 4096)
HELD_OUT = 2048
TWIN_ROWS = 512  # the twin's RBF SVM predicts one kernel row per support vector on one CPU core: keep it short
CUML_THREADS = (1, 2)


def synthetic_features(rows: int, classes: int = 5, seed: int = 0, spread: float = 0.04):
    """Class centres plus unit noise, float32, like a store's three backbones side by side; ``spread`` (the
    centres' scale) sets how much the classes overlap: 0.04 gives about 0.86 held-out accuracy from 8,192 rows."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    centers = rng.normal(0, spread, (classes, sum(DIMS))).astype(np.float32)
    X = rng.standard_normal((rows, sum(DIMS)), dtype=np.float32)
    X += centers[labels]
    return X, labels.astype(str)


def _timed(fn):
    """Seconds ``fn()`` took, and what it returned."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _step_seconds(be, model: FeatureStackingClassifier, X, codes) -> dict[str, float]:
    """Each step alone: row z-score + PCA, SVM fit, forest fit."""
    out = {"zscore+pca": _timed(lambda: model._reduce(be, X, fit=True))[0]}
    Z = model._reduce(be, X, fit=False)
    learners = model._base_learners(be)
    svm, forest = learners["svm"], learners["forest"]
    out["svm fit"] = _timed(lambda: svm.fit(Z, codes))[0]
    out["rf fit"] = _timed(lambda: forest.fit(Z, codes))[0]
    return out


def _imports(backend: str) -> bool:
    """Whether a backend's libraries import here; the benchmark measures the backends that do."""
    try:
        get_backend(backend)
    except AmlRapidsError:
        return False
    return True


def twin_agreement(fitted: FeatureStackingClassifier, X_test, predicted) -> dict:
    """How often a cuML model's scikit-learn twin predicts what the model does, or why it has none."""
    if fitted.backend_ == "sklearn":
        return {}
    try:
        twin = fitted.to_sklearn()
    except AmlRapidsError as exc:
        return {"heldout_agreement_with_cpu_twin": None, "cpu_twin": str(exc)}
    rows = slice(0, TWIN_ROWS)
    return {"heldout_agreement_with_cpu_twin": float(np.mean(twin.predict(X_test[rows]) == predicted[rows])),
            "cpu_twin_rows": len(X_test[rows])}


def stages(backend_name: str, X, y, X_test, y_test, pca: int, folds: list[int], threads_trial: bool = False):
    """Seconds per step, each stacking fit's breakdown, the held-out accuracy and predictions of the model
    fitted first, and its twin's agreement with it; ``threads_trial`` adds a fit on each of ``CUML_THREADS``."""
    be = get_backend(backend_name)
    model = FeatureStackingClassifier(block_dims=DIMS, pca_components=pca, backend=backend_name)
    codes = be.xp.asarray(np.unique(y, return_inverse=True)[1].astype(np.int32))
    out = _step_seconds(be, model, X, codes)
    predicted, breakdown, twin = None, {}, {}
    fits = [(k, None, f"stacking fit (all, {k} folds)") for k in folds]
    if threads_trial:
        fits += [(folds[0], n, f"stacking fit (all, {folds[0]} folds, {n} thread{'s' * (n > 1)})")
                 for n in CUML_THREADS]
    for k, jobs, name in fits:
        fitted = FeatureStackingClassifier(block_dims=DIMS, pca_components=pca, folds=k, backend=backend_name,
                                           n_jobs=jobs)
        try:
            out[name] = _timed(lambda: fitted.fit(X, y))[0]
        except Exception:  # a trial with another n_jobs: report its failure, keep the stage's other rows
            if jobs is None:
                raise
            traceback.print_exc()
            continue
        breakdown[name] = {"breakdown": fitted.fit_seconds_, "learner_seconds": fitted.learner_seconds_,
                           "n_jobs": jobs or "default"}
        if predicted is None:
            out["predict"], predicted = _timed(lambda: fitted.predict(X_test))
            twin = twin_agreement(fitted, X_test, predicted)
        elif jobs is not None:  # threads must not change the model
            breakdown[name]["heldout_agreement_with_default_n_jobs"] = float(np.mean(fitted.predict(X_test)
                                                                                    == predicted))
    return out, breakdown, {"heldout_accuracy": float(np.mean(predicted == y_test)), **twin}, predicted


def run(rows: int, pca: int, baseline_rows: int | None = None, folds: tuple[int, ...] = (5,)) -> list[dict]:
    baseline_rows = min(baseline_rows or rows, rows)
    X, y = synthetic_features(rows + HELD_OUT)
    X, y, X_test, y_test = X[:rows], y[:rows], X[rows:], y[rows:]
    plan = [("sklearn", baseline_rows)]
    if _imports("cuml"):
        plan += [("cuml", baseline_rows)] + ([("cuml", rows)] if rows > baseline_rows else [])
    results, predictions = [], {}
    for name, n in plan:
        timings, breakdown, quality, predictions[name, n] = stages(name, X[:n], y[:n], X_test, y_test, pca,
                                                                    list(folds), name == "cuml" and n == rows)
        for stage, seconds in timings.items():
            items = len(X_test) if stage == "predict" else n
            results.append({"variant": f"{name} {stage}", "items": items, "train_rows": n, "seconds_median": seconds,
                            "seconds": [seconds], "items_per_s": items / seconds, "warmup": False, **quality,
                            **breakdown.get(stage, {})})
    baseline = {(r["variant"].split(" ", 1)[1], r["train_rows"]): r["items_per_s"] for r in results
                if r["variant"].startswith("sklearn")}
    # The control: how often two scikit-learn models that differ only in their seed agree on the same rows.
    other_seed = FeatureStackingClassifier(block_dims=DIMS, pca_components=pca, folds=folds[0], seed=1,
                                           backend="sklearn").fit(X[:baseline_rows], y[:baseline_rows])
    agree = {"heldout_agreement_sklearn_seed_0_vs_1": float(np.mean(other_seed.predict(X_test)
                                                                    == predictions["sklearn", baseline_rows]))}
    if ("cuml", baseline_rows) in predictions:
        agree["heldout_agreement_with_sklearn"] = float(np.mean(predictions["cuml", baseline_rows]
                                                                == predictions["sklearn", baseline_rows]))
    for r in results:
        base = baseline.get((r["variant"].split(" ", 1)[1], r["train_rows"]))
        r["x_naive"] = r["items_per_s"] / base if base else None
        if r["train_rows"] == baseline_rows:
            r.update(agree)
    return results
