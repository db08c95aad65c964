"""One code path, two backends: the estimator classes and array module of cuML + CuPy or scikit-learn + NumPy.

Both expose the same scikit-learn API; the model code asks this module for classes and never imports either
library itself. ``auto`` takes cuML when a GPU is visible, and says so when it has to fall back because cuML does not import.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import AmlRapidsError, ConfigError
from ..provenance import usable_cores

CUML_FIT_JOBS = 4  # the fastest of 1, 2 and 4 on an H200 (docs/classifier.md)


@dataclass(frozen=True)
class Backend:
    name: str
    xp: ModuleType
    PCA: Any
    IncrementalPCA: Any
    SVC: Any
    RandomForestClassifier: Any
    LogisticRegression: Any
    svc_options: dict
    forest_options: dict
    fit_jobs: int  # base-learner fits run at once by default (docs/classifier.md)

    def pca_options(self, seed: int) -> dict:
        """cuML's PCA has no random_state (its solvers are deterministic); scikit-learn's takes one."""
        return {"random_state": seed} if self.name == "sklearn" else {}

    def asarray(self, values) -> Any:
        return self.xp.asarray(values, dtype=self.xp.float32)

    def embedder(self, method: str, **options) -> Any:
        """A 2-D t-SNE or UMAP estimator of this backend (imported on demand: UMAP's numba start costs seconds)."""
        if method == "tsne":
            if self.name == "cuml":
                from cuml.manifold import TSNE
                return TSNE(n_components=2, **options)
            from sklearn.manifold import TSNE
            return TSNE(n_components=2, init="pca", n_jobs=usable_cores(), **options)
        if method == "umap":
            if self.name == "cuml":
                from cuml.manifold import UMAP
            else:
                from umap import UMAP
            return UMAP(n_components=2, **options)
        raise ConfigError(f"unknown embedding method {method!r}; use tsne or umap")

    def __reduce__(self):
        """A backend travels by name (its array module cannot be pickled): a Dask worker makes its own."""
        return get_backend, (self.name,)

    @staticmethod
    def to_host(values) -> np.ndarray:
        return values.get() if hasattr(values, "get") else np.asarray(values)


def _sklearn() -> Backend:
    from sklearn.decomposition import PCA, IncrementalPCA
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC
    return Backend("sklearn", np, PCA, IncrementalPCA, SVC, RandomForestClassifier, LogisticRegression,
                   {"decision_function_shape": "ovr"}, {"n_jobs": -1}, usable_cores())


def _cuml() -> Backend:
    try:
        import cupy
        from cuml.decomposition import PCA, IncrementalPCA
        from cuml.ensemble import RandomForestClassifier
        from cuml.linear_model import LogisticRegression
        from cuml.svm import SVC
    except ImportError as exc:
        raise ConfigError(f"backend cuml asked for, but it does not import ({exc}); install aml-rapids[cu13] "
                          "or [cu12] on a GPU machine, or use --backend sklearn") from None
    # one-vs-one training, as scikit-learn's SVC (docs/classifier.md); the option's name depends on the version
    shape = "decision_function_shape" if "decision_function_shape" in inspect.signature(SVC).parameters \
        else "multiclass_strategy"
    return Backend("cuml", cupy, PCA, IncrementalPCA, SVC, RandomForestClassifier, LogisticRegression,
                   {shape: "ovo"}, {}, CUML_FIT_JOBS)


def get_backend(name: str = "auto") -> Backend:
    if name == "sklearn":
        return _sklearn()
    if name == "cuml":
        return _cuml()
    if name != "auto":
        raise ConfigError(f"unknown backend {name!r}; use auto, cuml or sklearn")
    import torch
    if not torch.cuda.is_available():
        return _sklearn()
    try:
        return _cuml()
    except AmlRapidsError as exc:
        warnings.warn(f"a GPU is visible but {exc}; backend auto uses scikit-learn on the CPU", stacklevel=2)
        return _sklearn()
