"""Classifier stage on synthetic features shaped like the store's (rows x [1280, 2048, 4096]): each step on
its own (row z-score + PCA, SVM fit, forest fit), the whole stacking fit and predict, for every available
backend in the same run; scikit-learn on this machine's cores is the baseline.

scikit-learn's RBF SVM grows quadratically with rows, so on a GPU machine the baseline may be measured on fewer
rows (``baseline_rows``) than cuML; ratios only compare the two at the same row count. Where both backends run,
the share of rows on which their fitted models predict the same class is recorded too."""

from __future__ import annotations

import time

import numpy as np

from aml_rapids.classify.backend import get_backend
from aml_rapids.classify.model import FeatureStackingClassifier
from aml_rapids.errors import AmlRapidsError

DIMS = (1280, 2048, 4096)


def synthetic_features(rows: int, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent feature patterns plus noise, float32, like a store's three backbones side by side."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    centers = rng.normal(0, 1, (classes, sum(DIMS))).astype(np.float32)
    return centers[labels] + rng.normal(0, 2, (rows, sum(DIMS))).astype(np.float32), labels.astype(str)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def stages(backend_name: str, X: np.ndarray, y: np.ndarray, pca: int) -> tuple[dict[str, float], np.ndarray]:
    """Seconds per step, and the fitted stacking model's predicted classes."""
    be = get_backend(backend_name)
    model = FeatureStackingClassifier(block_dims=DIMS, pca_components=pca, backend=backend_name)
    codes = be.xp.asarray(np.unique(y, return_inverse=True)[1].astype(np.int32))
    out = {"zscore+pca": _timed(lambda: model._reduce(be, X, fit=True))}
    Z = model._reduce(be, X, fit=False)
    svm, forest = model._base_learners(be)
    out["svm fit"] = _timed(lambda: svm.fit(Z, codes))
    out["rf fit"] = _timed(lambda: forest.fit(Z, codes))
    out["stacking fit (all)"] = _timed(lambda: model.fit(X, y))
    predicted = []
    out["predict"] = _timed(lambda: predicted.append(model.predict(X)))
    return out, predicted[0]


def run(rows: int, pca: int, baseline_rows: int | None = None) -> list[dict]:
    baseline_rows = min(baseline_rows or rows, rows)
    X, y = synthetic_features(rows)
    plan = [("sklearn", baseline_rows), ("cuml", baseline_rows)] + ([("cuml", rows)] if rows > baseline_rows else [])
    results, predictions = [], {}
    for name, n in plan:
        try:
            timings, predictions[name, n] = stages(name, X[:n], y[:n], pca)
        except AmlRapidsError:
            continue  # cuML is not installed here
        for stage, seconds in timings.items():
            results.append({"variant": f"{name} {stage}", "items": n, "seconds_median": seconds,
                            "seconds": [seconds], "items_per_s": n / seconds, "warmup": False})
    baseline = {(r["variant"].split(" ", 1)[1], r["items"]): r["items_per_s"] for r in results
                if r["variant"].startswith("sklearn")}
    agree = {}
    if ("cuml", baseline_rows) in predictions:
        agree = {"agreement_with_sklearn": float(np.mean(predictions["cuml", baseline_rows]
                                                         == predictions["sklearn", baseline_rows]))}
    for r in results:
        base = baseline.get((r["variant"].split(" ", 1)[1], r["items"]))
        r["x_naive"] = r["items_per_s"] / base if base else None
        if r["variant"].startswith("cuml") and r["items"] == baseline_rows:
            r.update(agree)
    return results
