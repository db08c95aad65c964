"""The published classifier as one scikit-learn-compatible estimator: per-backbone row-wise z-score and PCA,
an RBF SVM and a random forest, stacked by a logistic-regression meta-learner. For the ablation study either
learner can be left out (``learners``), and the stacking replaced by an equal-weight average (``combine``).

Stacking without leakage: the meta-learner is fitted on out-of-fold outputs only. Folds are grouped (by
patient, or by cell so that oversampled copies of one cell stay together), so no base-learner output it sees
was fitted on the same row, the same cell or the same patient. The base learners that predict are fitted on all
rows; every base-learner fit is independent of the others, and they run side by side.
SVM scores are ``decision_function`` values (cuML's SVC has no ``probability``), the forest's are class
probabilities; both backends compute them the same way.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.utils import resample

from ..errors import AmlRapidsError, ConfigError, DataError
from ..timing import span
from .backend import Backend, get_backend


LEARNERS = ("svm", "forest")  # the base learners, in the order of their output columns
COMBINES = ("stacking", "average")
STEP_NAMES = {"svm": ("svm refit", "fold svm fit"), "forest": ("rf refit", "fold rf fit")}  # (all rows, a fold)


def row_zscore(xp, block):
    """Each row to zero mean and unit standard deviation (the method's normalisation), on its backend."""
    mean = block.mean(axis=1, keepdims=True)
    std = block.std(axis=1, keepdims=True)
    return (block - mean) / xp.where(std > 0, std, 1)


def grouped_folds(codes: np.ndarray, groups, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds that never split a group (None: every row its own group).

    When each group holds one class (a cell and its oversampled copies; a patient, whose class is their
    diagnosis) and every class has a group per fold, the groups themselves are split by StratifiedKFold and their
    rows follow. Otherwise (groups of mixed classes, classes with fewer groups than folds) scikit-learn's
    StratifiedGroupKFold decides; it searches group by group in Python (8 s for 56,850 one-row groups on the
    reference machine), so it is not the common path."""
    rows = np.arange(len(codes))
    groups = rows if groups is None else np.asarray(groups)
    names, group_of = np.unique(groups, return_inverse=True)
    group_code = np.zeros(len(names), dtype=codes.dtype)
    group_code[group_of] = codes
    try:
        if not np.array_equal(group_code[group_of], codes) or np.bincount(group_code).min() < n_folds:
            return list(StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(rows, codes, groups))
        split = StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(names)), group_code)
    except ValueError as exc:  # too few groups (patients or cells) for the folds
        raise DataError(f"cannot make {n_folds} grouped stacking folds from {len(names)} groups (patients, or "
                        f"cells without patients): {str(exc).rstrip('.')}; lower classify.folds") from None
    return [(rows[np.isin(group_of, train)], rows[np.isin(group_of, held)]) for train, held in split]


def _device_sync(be: Backend) -> Callable[[], None] | None:
    """What a fit phase's timing waits for at its ends: on cuML, CuPy's current stream, where the model's own
    array work (z-score, indexing, outputs) is queued asynchronously; else nothing."""
    return (lambda: be.xp.cuda.get_current_stream().synchronize()) if be.name == "cuml" else None


def _fit_learner(estimator, Z, labels, rows, step: str) -> tuple[object, dict[str, float]]:
    """Fit one base learner on ``rows`` of Z (all of Z when None); returns it (from a Dask worker, a copy) and its
    seconds under ``step``. No device wait: cuML's fits return once their GPU work is done (its SVC synchronises
    its handle, its forest returns a Treelite model on the host), and a wait in one thread would stall on the
    others' queued work."""
    took: dict[str, float] = {}
    with span(took, step):
        estimator.fit(Z if rows is None else Z[rows], labels if rows is None else labels[rows])
    return estimator, took


def _svc_as_sklearn(svc):
    """cuML's multiclass SVC is scikit-learn's OneVsOneClassifier over two-class cuML SVCs (kept in its
    ``_multiclass``), and cuML converts only two-class SVCs; the twin is that OneVsOneClassifier over the
    converted pairs, which votes and scores as the cuML model does (scikit-learn's own code on both sides)."""
    wrapper = getattr(getattr(svc, "_multiclass", None), "multiclass_estimator", None)
    if wrapper is None:
        return svc.as_sklearn()
    twin = copy.copy(wrapper)
    twin.estimators_ = [pair.as_sklearn() for pair in wrapper.estimators_]
    twin.estimator = clone(twin.estimators_[0])  # not the cuML template, so the twin unpickles without cuML
    return twin


class FeatureStackingClassifier(ClassifierMixin, BaseEstimator):
    """``X`` is the backbones' features side by side; ``block_dims`` says where each backbone's columns are.

    ``zscore``: each row of each backbone to zero mean and unit spread first (the method), or not.
    ``pca_components``: an int is a count of components, a float in (0, 1) the share of variance to keep, None no
    PCA (the features go to the learners whole; ``zscore`` and None exist for the ablation study).
    ``pca_mode``: ``per_backbone`` (a PCA per backbone, outputs side by side, as the method) or
    ``concatenated`` (z-scored backbones side by side, then one PCA).
    ``n_jobs``: base learners fitted at once, on threads (None: every core with scikit-learn, 4 with cuML).
    ``learners``: the base learners, of ``LEARNERS``; a learner left out has no fitted estimator (None).
    ``combine``: ``stacking`` (one logistic regression on every learner's out-of-fold outputs, the method) or
    ``average``: each learner's out-of-fold outputs calibrated by a logistic regression of its own, and their
    probabilities averaged with equal weight, so nothing learns how to weigh one learner against the other.
    ``svm_max_rows``: each SVM is fitted on at most this many of its rows, a class-stratified seeded sample (None:
    all): cuML has no distributed SVC, and its solver's time grows faster than the rows (docs/scaling.md)."""

    def __init__(self, block_dims=(1280,), pca_components=128, pca_mode="per_backbone", svm_c=1.0, rf_trees=100,
                 rf_max_depth=16, rf_max_samples=0.5, folds=5, seed=0, backend="auto", n_jobs=None, zscore=True,
                 learners=("svm", "forest"), combine="stacking", svm_max_rows=None):
        self.block_dims = block_dims
        self.learners = learners
        self.combine = combine
        self.zscore = zscore
        self.pca_components = pca_components
        self.pca_mode = pca_mode
        self.svm_c = svm_c
        self.svm_max_rows = svm_max_rows
        self.rf_trees = rf_trees
        self.rf_max_depth = rf_max_depth
        self.rf_max_samples = rf_max_samples
        self.folds = folds
        self.seed = seed
        self.backend = backend
        self.n_jobs = n_jobs

    def _backend(self) -> Backend:
        return get_backend(self.backend)

    def _blocks(self, X):
        if X.shape[1] != sum(self.block_dims):
            raise DataError(f"features have {X.shape[1]} columns, the model expects {sum(self.block_dims)} "
                            f"({' + '.join(map(str, self.block_dims))})")
        edges = np.cumsum((0, *self.block_dims))
        return [X[:, a:b] for a, b in zip(edges[:-1], edges[1:])]

    def _reduction_dims(self) -> tuple[int, ...]:
        return self.block_dims if self.pca_mode == "per_backbone" else (sum(self.block_dims),)

    def _zscored(self, be: Backend, X) -> list:
        """The (row-z-scored) inputs of each PCA: one per backbone, or all backbones side by side."""
        blocks = [row_zscore(be.xp, be.asarray(block)) if self.zscore else be.asarray(block)
                  for block in self._blocks(X)]
        return blocks if self.pca_mode == "per_backbone" else [be.xp.concatenate(blocks, axis=1)]

    def pca_fit_components(self, rows: int) -> list[int]:
        """Components each PCA is fitted with: the count asked for, or all there are for a variance share."""
        if self.pca_components is None:
            return []
        wanted = self.pca_components if self.pca_components >= 1 else rows
        return [min(int(wanted), rows, dim) for dim in self._reduction_dims()]

    def _keep(self, pca) -> int:
        """Components kept: the count, or the fewest that explain the asked share of the variance."""
        if self.pca_components >= 1:
            return int(pca.n_components)
        ratios = np.cumsum(Backend.to_host(pca.explained_variance_ratio_))
        return int(min(np.searchsorted(ratios, self.pca_components) + 1, len(ratios)))

    def _fit_pcas(self, pcas: list) -> None:
        self.pcas_, self.kept_ = pcas, [self._keep(pca) for pca in pcas]

    def _reduce(self, be: Backend, X, fit: bool):
        """Row z-score and PCA, outputs side by side; ``fit`` fits the PCAs on X first."""
        inputs = self._zscored(be, X)
        if fit:
            self._fit_pcas([be.PCA(n_components=n, **be.pca_options(self.seed)).fit(block)
                            for n, block in zip(self.pca_fit_components(X.shape[0]), inputs)])
        if self.pca_components is None:
            return be.xp.concatenate(inputs, axis=1).astype(be.xp.float32)
        out = [pca.transform(block)[:, :kept] for pca, kept, block in zip(self.pcas_, self.kept_, inputs)]
        return be.xp.concatenate(out, axis=1).astype(be.xp.float32)

    def _base_learners(self, be: Backend) -> dict:
        """A fresh estimator of each chosen learner, in ``LEARNERS`` order."""
        unknown = sorted(set(self.learners) - set(LEARNERS))
        if unknown or not self.learners:
            raise ConfigError(f"classify.learners {list(self.learners)}: choose one or both of {', '.join(LEARNERS)}")
        made = {"svm": lambda: be.SVC(kernel="rbf", C=self.svm_c, gamma="scale", **be.svc_options),
                "forest": lambda: be.RandomForestClassifier(n_estimators=self.rf_trees, max_depth=self.rf_max_depth,
                                                            max_samples=self.rf_max_samples, random_state=self.seed,
                                                            **be.forest_options)}
        return {name: made[name]() for name in LEARNERS if name in self.learners}

    def _fitted_learners(self) -> dict:
        return {name: learner for name, learner in (("svm", self.svm_), ("forest", self.forest_)) if learner is not None}

    def _learner_outputs(self, be: Backend, name: str, learner, Z):
        """SVM scores or forest probabilities, one column per class of the whole training set, even when a
        fold's training part lacked a class (its columns then say 'never this class')."""
        n = len(self.classes_)
        present = be.to_host(learner.classes_).astype(int)
        if name == "forest":
            full_proba = be.xp.zeros((Z.shape[0], n), dtype=be.xp.float32)
            full_proba[:, present] = be.asarray(learner.predict_proba(Z))
            return full_proba
        scores = be.asarray(learner.decision_function(Z))
        if scores.ndim == 1:
            scores = be.xp.stack([-scores, scores], axis=1)
        full_scores = be.xp.full((Z.shape[0], n), float(scores.min()) - 1.0, dtype=be.xp.float32)
        full_scores[:, present] = scores
        return full_scores

    def _base_outputs(self, be: Backend, learners: dict, Z):
        """Every learner's outputs side by side (a block of one column per class each, in ``LEARNERS`` order)."""
        return be.xp.concatenate([self._learner_outputs(be, name, learner, Z) for name, learner in learners.items()],
                                 axis=1)

    def _blocks_of(self, outputs) -> list:
        n = len(self.classes_)
        return [outputs[:, k * n:(k + 1) * n] for k in range(outputs.shape[1] // n)]

    def _combined(self, be: Backend, outputs):
        """Class probabilities from the learners' outputs: the meta-learner's, or the calibrated learners' mean."""
        inputs = self._meta_inputs(be, outputs)
        if self.combine == "stacking":
            return self.meta_.predict_proba(inputs)
        return sum(meta.predict_proba(block) for meta, block in zip(self.meta_, self._blocks_of(inputs))) / len(self.meta_)

    def _in_parallel(self, be: Backend, calls: list) -> list:
        """The results of joblib ``delayed`` calls in order, ``n_jobs`` of them running at once: on threads, or
        as Dask tasks inside ``joblib.parallel_config(backend="dask")`` (``scale.fits``). On threads, the fits
        release the GIL (libsvm, the forest's trees, cuML's C++), and each cuML thread queues on its own
        per-thread stream; scikit-learn's SVC uses one core, so on a CPU the SVMs of different folds run side by
        side."""
        return Parallel(n_jobs=min(self.n_jobs or be.fit_jobs, len(calls)), prefer="threads", batch_size=1)(calls)

    def _svm_rows(self, be: Backend, rows, host_rows: np.ndarray | None, codes: np.ndarray):
        """The rows an SVM is fitted on: ``rows`` (None: all), or ``svm_max_rows`` of them, sampled within each
        class in proportion to its rows (scikit-learn's stratified ``resample``), seeded, with at least one row of
        every class (a class too rare for a row of its own share gets one more)."""
        chosen = np.arange(len(codes)) if host_rows is None else host_rows
        if self.svm_max_rows is None or len(chosen) <= self.svm_max_rows:
            return rows
        sample = resample(chosen, replace=False, n_samples=self.svm_max_rows, stratify=codes[chosen],
                          random_state=self.seed)
        lacking = np.setdiff1d(codes[chosen], codes[sample])  # a class too rare for its share: one row of it
        extra = [np.random.default_rng(self.seed).choice(chosen[codes[chosen] == c]) for c in lacking]
        return be.xp.asarray(np.sort(np.concatenate([sample, np.asarray(extra, dtype=sample.dtype)])))

    def _meta_inputs(self, be: Backend, outputs):
        """Base outputs standardised per column with the out-of-fold outputs' mean and spread: SVM scores span
        about ten times the forest's probabilities, and unscaled they took the meta-learner's lbfgs 1,087
        iterations (9 s) on PBC, against 77 (0.7 s) scaled."""
        return (outputs - be.asarray(self.meta_center_)) / be.asarray(self.meta_scale_)

    def fit(self, X, y, groups=None):
        be = self._backend()
        seconds: dict[str, float] = {}
        with span(seconds, "zscore+pca", _device_sync(be)):
            Z = self._reduce(be, X, fit=True)
        return self._fit_reduced(be, Z, y, groups, seconds)

    def fit_streaming(self, blocks, y, groups=None):
        """The same model from features too large for memory: ``blocks()`` yields the rows of X in order, a
        block at a time (each with at least ``max(pca_fit_components(rows))`` rows), and is called twice. The
        PCAs are fitted incrementally (IncrementalPCA), so only the reduced features are ever held whole."""
        if self.pca_components is None:
            raise ConfigError("training without PCA holds every feature in memory: raise classify.memory_gb, or "
                              "keep classify.pca_components")
        be = self._backend()
        pcas = [be.IncrementalPCA(n_components=n) for n in self.pca_fit_components(len(y))]
        seconds: dict[str, float] = {}
        with span(seconds, "zscore+pca", _device_sync(be)):
            for X in blocks():
                for pca, block in zip(pcas, self._zscored(be, X)):
                    pca.partial_fit(block)
            self._fit_pcas(pcas)
            Z = be.xp.concatenate([self._reduce(be, X, fit=False) for X in blocks()])
        return self._fit_reduced(be, Z, y, groups, seconds)

    def _fit_reduced(self, be: Backend, Z, y, groups, seconds: dict[str, float]):
        """Base learners on each fold's training groups and on all rows (independent fits, ``n_jobs`` at once),
        then the meta-learner on the folds' held-out outputs.
        ``fit_seconds_`` keeps the wall time of each phase (the device synchronised at each end);
        ``learner_seconds_`` each kind of base-learner fit, summed over folds: with ``n_jobs`` above one the fits
        overlap, and their sum exceeds the phase's wall time."""
        y = np.asarray(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DataError(f"training rows hold a single class ({self.classes_[0]!r}); need at least two")
        if Z.shape[0] != len(y):
            raise AmlRapidsError(f"{Z.shape[0]} feature rows but {len(y)} labels")
        labels = be.xp.asarray(codes.astype(np.int32))
        sync = _device_sync(be)
        with span(seconds, "fold split", sync):
            host_folds = grouped_folds(codes, groups, self.folds, self.seed)
            folds = [(be.xp.asarray(train), be.xp.asarray(held)) for train, held in host_folds]
        single = [k for k, (train, _) in enumerate(host_folds) if len(np.unique(codes[train])) < 2]
        if single:
            raise DataError(f"stacking fold {single[0]}'s training part holds a single class: too few groups "
                            f"(patients, or cells) of the other classes for classify.folds={self.folds}; lower "
                            "classify.folds or train on more patients")
        if self.combine not in COMBINES:
            raise ConfigError(f"classify.combine {self.combine!r}: use {' or '.join(COMBINES)}")
        # One set of learners per fold and the final set on all rows: independent fits, the largest first.
        sets = [self._base_learners(be) for _ in range(len(folds) + 1)]
        rows_of = [None] + [train for train, _ in folds]  # all rows, then each fold's training rows
        svm_rows = [self._svm_rows(be, rows, None if k == 0 else host_folds[k - 1][0], codes)
                    for k, rows in enumerate(rows_of)]
        which = [(k, name) for k, learners in enumerate(sets) for name in learners]
        fits = [delayed(_fit_learner)(sets[k][name], Z, labels, svm_rows[k] if name == "svm" else rows_of[k],
                                      STEP_NAMES[name][k > 0]) for k, name in which]
        busy: Counter[str] = Counter()
        with span(seconds, "base learner fits", sync):
            for (k, name), (fitted, took) in zip(which, self._in_parallel(be, fits)):
                sets[k][name] = fitted
                busy.update(took)
        self.learner_seconds_ = dict(busy)
        final, fold_sets = sets[0], sets[1:]
        self.svm_, self.forest_ = final.get("svm"), final.get("forest")
        with span(seconds, "fold outputs", sync):
            outputs = self._in_parallel(be, [delayed(self._base_outputs)(be, learners, Z[held])
                                             for learners, (_, held) in zip(fold_sets, folds)])
            self.oof_ = be.xp.zeros((len(y), outputs[0].shape[1]), dtype=be.xp.float32)
            for (_, held), fold_outputs in zip(folds, outputs):
                self.oof_[held] = fold_outputs
        with span(seconds, "meta fit", sync):
            oof = Backend.to_host(self.oof_)
            self.meta_center_, spread = oof.mean(axis=0), oof.std(axis=0)
            self.meta_scale_ = np.where(spread > 0, spread, 1.0).astype(np.float32)
            inputs = self._meta_inputs(be, self.oof_)
            if self.combine == "stacking":
                self.meta_ = be.LogisticRegression(max_iter=2000).fit(inputs, labels)
            else:
                self.meta_ = [be.LogisticRegression(max_iter=2000).fit(block, labels) for block in self._blocks_of(inputs)]
        self.fit_seconds_ = seconds
        self.backend_ = be.name
        return self

    def to_sklearn(self) -> "FeatureStackingClassifier":
        """A copy whose fitted estimators are scikit-learn's (cuML's ``as_sklearn``), usable on any CPU.

        cuML 26.x converts PCA, random forest, logistic regression and two-class SVC; its multiclass SVC is
        converted pair by pair (``_svc_as_sklearn``). Whatever cuML cannot convert raises AmlRapidsError
        naming cuML's reason."""
        if self.backend_ == "sklearn":
            return self
        twin = copy.copy(self)
        try:
            twin.pcas_ = [pca.as_sklearn() for pca in self.pcas_]
            twin.svm_ = None if self.svm_ is None else _svc_as_sklearn(self.svm_)
            twin.forest_ = None if self.forest_ is None else self.forest_.as_sklearn()
            twin.meta_ = (self.meta_.as_sklearn() if self.combine == "stacking"
                          else [meta.as_sklearn() for meta in self.meta_])
        except Exception as exc:  # cuML raises its own UnsupportedOnCPU, or NotImplementedError in older versions
            raise AmlRapidsError(f"cuML cannot convert this model to scikit-learn ({type(exc).__name__}: {exc}); "
                                 "it runs only where cuML and a GPU are (train with --backend sklearn for a "
                                 "model any CPU can use)") from exc
        twin.oof_ = Backend.to_host(self.oof_)
        twin.backend = twin.backend_ = "sklearn"
        return twin

    def transform(self, X):
        """The space the base learners read: row z-score and PCA (on the host), as ``predict_proba`` computes it."""
        be = get_backend(self.backend_)
        return be.to_host(self._reduce(be, X, fit=False))

    def predict_proba(self, X):
        be = get_backend(self.backend_)
        Z = self._reduce(be, X, fit=False)
        return be.to_host(self._combined(be, self._base_outputs(be, self._fitted_learners(), Z)))

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]
