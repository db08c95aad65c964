"""Row z-score and PCA of training features too large for one GPU (or one host's memory), on the Dask cluster:
dask arrays read from the Zarr store, each worker z-scoring its own chunks and adding up their sums and Gram
matrix (in float64), the client eigen-decomposing the small (dim x dim) covariance, and the workers then projecting
their chunks. Only the reduced features (a few hundred columns a row) ever come back whole; the base learners are
fitted on them as Dask tasks (``scale.fits``).

The decomposition is scikit-learn's ``covariance_eigh`` PCA solver (and cuML's distributed PCA's): exact, the
same whether the chunks are NumPy (CPU workers) or CuPy (GPU workers, ``classify.backend`` cuml) arrays, so the CPU
cluster of the tests runs the same code as a GPU cluster. The SVM and the forest then read the reduced features,
which fit in one GPU up to tens of millions of cells (docs/scaling.md), so they are fitted whole, each on one worker.
"""

from __future__ import annotations

import numpy as np

from ..classify.backend import Backend, get_backend
from ..classify.model import FeatureStackingClassifier, row_zscore
from ..features.store import FeatureStore


def store_arrays(store: FeatureStore, backbones: list[str], keep: np.ndarray, backend: str):
    """Each backbone's kept rows as a lazy float32 dask array, chunked as the store (CuPy chunks for cuML)."""
    import dask.array as da

    rows = np.flatnonzero(keep)
    arrays = []
    for name in backbones:
        array = da.from_zarr(store.features(name))[rows].astype(np.float32)
        if backend == "cuml":
            import cupy

            array = array.map_blocks(cupy.asarray, dtype=np.float32)
        arrays.append(array)
    return arrays


def pca_inputs(model: FeatureStackingClassifier, arrays: list) -> list:
    """What each PCA reads (lazily): every row z-scored within its backbone, one input per backbone or all side by
    side, as ``FeatureStackingClassifier._zscored`` makes them in memory."""
    import dask.array as da

    if model.zscore:  # NumPy's functions dispatch to CuPy for CuPy chunks (NEP 18)
        arrays = [a.map_blocks(lambda block: row_zscore(np, block), dtype=np.float32) for a in arrays]
    return arrays if model.pca_mode == "per_backbone" else [da.concatenate(arrays, axis=1)]


def covariance_pca(inputs: list, n_components: list[int], client=None):
    """scikit-learn PCAs fitted as its ``covariance_eigh`` solver fits them, from each input's column sums and Gram
    matrix, computed chunk by chunk on the cluster in float64."""
    import dask
    from sklearn.decomposition import PCA
    from sklearn.utils.extmath import svd_flip

    sums = [(x.astype(np.float64).sum(axis=0), x.astype(np.float64).T @ x.astype(np.float64)) for x in inputs]
    computed = dask.compute(*sums, scheduler=client)
    pcas = []
    for x, (total, gram), k in zip(inputs, computed, n_components):
        total, gram = Backend.to_host(total), Backend.to_host(gram)
        n = x.shape[0]
        mean = total / n
        covariance = (gram - n * np.outer(mean, mean)) / (n - 1)
        eigenvalues, vectors = np.linalg.eigh(covariance)
        eigenvalues, vectors = np.clip(eigenvalues[::-1], 0, None), vectors[:, ::-1]
        _, components = svd_flip(None, vectors.T, u_based_decision=False)
        pca = PCA(n_components=k, svd_solver="covariance_eigh")
        pca.n_features_in_, pca.n_samples_, pca.n_components_ = x.shape[1], n, k
        pca.mean_ = mean.astype(np.float32)
        pca.components_ = components[:k].astype(np.float32)
        pca.explained_variance_ = eigenvalues[:k].astype(np.float32)
        pca.explained_variance_ratio_ = (eigenvalues[:k] / eigenvalues.sum()).astype(np.float32)
        pca.singular_values_ = np.sqrt(eigenvalues[:k] * (n - 1)).astype(np.float32)
        pca.noise_variance_ = float(eigenvalues[k:].mean()) if k < min(x.shape) else 0.0
        pcas.append(pca)
    return pcas


def reduced_features(be: Backend, pcas: list, kept: list[int], inputs: list, client=None):
    """The kept principal components of every row, side by side, projected on the workers: (rows, kept) float32."""
    import dask
    import dask.array as da

    parts = [(x - be.asarray(pca.mean_)) @ be.asarray(pca.components_[:k]).T for x, pca, k in zip(inputs, pcas, kept)]
    (Z,) = dask.compute(da.concatenate(parts, axis=1).astype(np.float32), scheduler=client)
    return Z


def fit_on_cluster(model: FeatureStackingClassifier, store: FeatureStore, backbones: list[str], keep: np.ndarray,
                   y: np.ndarray, groups=None) -> FeatureStackingClassifier:
    """``model`` fitted on the kept rows of the store with the PCAs and the projection computed on the cluster
    (the connected Dask client), then the base learners and meta-learner on the reduced features."""
    from ..errors import ClusterError, ConfigError
    from ..timing import span

    if model.pca_components is None:
        raise ConfigError("training without PCA holds every feature in memory: raise classify.memory_gb, or keep "
                          "classify.pca_components")
    from distributed import get_client

    try:
        client = get_client()
    except ValueError:
        raise ClusterError("PCA on the Dask cluster needs a connected cluster: train through workflow.train (or the "
                           "CLI) with scale.cluster set, which opens one") from None
    be = get_backend(model.backend)
    seconds: dict[str, float] = {}
    with span(seconds, "zscore+pca"):
        inputs = pca_inputs(model, store_arrays(store, backbones, keep, be.name))
        pcas = covariance_pca(inputs, model.pca_fit_components(len(y)), client)
        model._fit_pcas(pcas if be.name == "sklearn" else [be.PCA.from_sklearn(p) for p in pcas])
        Z = reduced_features(be, pcas, model.kept_, inputs, client)
    return model._fit_reduced(be, be.asarray(Z), y, groups, seconds)
