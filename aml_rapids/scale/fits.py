"""The classifier's independent fits (every fold's base learners and the final pair, then the folds' outputs) as
Dask tasks, through joblib's Dask backend: ``FeatureStackingClassifier`` runs its fits with joblib, on threads by
default, and inside ``fits_on`` each becomes a task on the cluster (one GPU each on dask-cuda). The model is the
threaded path's: the same estimators, seeds and data, only where each fit runs differs. The training features
are sent to the workers once (joblib scatters large arguments) and the fitted learners come back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..config import RunConfig


@contextmanager
def fits_on(client, cfg: RunConfig) -> Iterator[RunConfig]:
    """Inside: joblib calls run on the client's cluster; yields ``cfg`` with ``classify.n_jobs`` (where unset)
    the cluster's threads, so every fit is submitted at once."""
    from joblib import parallel_config

    threads = sum(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values())
    if cfg.classify.n_jobs is None:
        cfg = cfg.model_copy(update={"classify": cfg.classify.model_copy(update={"n_jobs": threads})})
    with parallel_config(backend="dask", client=client):
        yield cfg
