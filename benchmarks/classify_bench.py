"""Classifier stage on synthetic features shaped like the store's (rows x [1280, 2048, 4096]): each step on
its own (row z-score + PCA, SVM fit, forest fit), the whole stacking fit and predict, for every available
backend in the same run; scikit-learn on this machine's cores is the baseline."""

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


def stages(backend_name: str, X: np.ndarray, y: np.ndarray, pca: int) -> dict[str, float]:
    be = get_backend(backend_name)
    model = FeatureStackingClassifier(block_dims=DIMS, pca_components=pca, backend=backend_name)
    codes = be.xp.asarray(np.unique(y, return_inverse=True)[1].astype(np.int32))
    out = {"zscore+pca": _timed(lambda: model._reduce(be, X, fit=True))}
    Z = model._reduce(be, X, fit=False)
    svm, forest = model._base_learners(be)
    out["svm fit"] = _timed(lambda: svm.fit(Z, codes))
    out["rf fit"] = _timed(lambda: forest.fit(Z, codes))
    out["stacking fit (all)"] = _timed(lambda: model.fit(X, y))
    out["predict"] = _timed(lambda: model.predict_proba(X))
    return out


def run(rows: int, pca: int) -> list[dict]:
    X, y = synthetic_features(rows)
    results = []
    for name in ("sklearn", "cuml"):
        try:
            timings = stages(name, X, y, pca)
        except AmlRapidsError:
            continue  # cuML is not installed here
        for stage, seconds in timings.items():
            results.append({"variant": f"{name} {stage}", "items": rows, "seconds_median": seconds,
                            "seconds": [seconds], "items_per_s": rows / seconds, "warmup": False})
    baseline = {r["variant"].split(" ", 1)[1]: r["items_per_s"] for r in results if r["variant"].startswith("sklearn")}
    for r in results:
        r["x_naive"] = r["items_per_s"] / baseline[r["variant"].split(" ", 1)[1]]
    return results
