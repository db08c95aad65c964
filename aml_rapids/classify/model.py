"""The published classifier as one scikit-learn-compatible estimator: per-backbone row-wise z-score and PCA,
an RBF SVM and a random forest, stacked by a logistic-regression meta-learner.

Stacking without leakage: the meta-learner is fitted on out-of-fold outputs only. Folds are grouped (by
patient, or by cell so that oversampled copies of one cell stay together), so no base-learner output it sees
was fitted on the same row, the same cell or the same patient. The base learners are then refitted on all rows.
SVM scores are ``decision_function`` values (cuML's SVC has no ``probability``), the forest's are class
probabilities; both backends compute them the same way.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import AmlRapidsError
from .backend import Backend, get_backend


def row_zscore(xp, block):
    """Each row to zero mean and unit standard deviation (the method's normalisation), on its backend."""
    mean = block.mean(axis=1, keepdims=True)
    std = block.std(axis=1, keepdims=True)
    return (block - mean) / xp.where(std > 0, std, 1)


class FeatureStackingClassifier(ClassifierMixin, BaseEstimator):
    """``X`` is the backbones' features side by side; ``block_dims`` says where each backbone's columns are."""

    def __init__(self, block_dims=(1280,), pca_components=128, svm_c=1.0, rf_trees=100, folds=5, seed=0,
                 backend="auto"):
        self.block_dims = block_dims
        self.pca_components = pca_components
        self.svm_c = svm_c
        self.rf_trees = rf_trees
        self.folds = folds
        self.seed = seed
        self.backend = backend

    def _backend(self) -> Backend:
        return get_backend(self.backend)

    def _blocks(self, X):
        if X.shape[1] != sum(self.block_dims):
            raise AmlRapidsError(f"features have {X.shape[1]} columns, the model expects {sum(self.block_dims)} "
                                 f"({' + '.join(map(str, self.block_dims))})")
        edges = np.cumsum((0, *self.block_dims))
        return [X[:, a:b] for a, b in zip(edges[:-1], edges[1:])]

    def _reduce(self, be: Backend, X, fit: bool):
        if fit:
            self.pcas_ = []
        out = []
        for i, block in enumerate(self._blocks(X)):
            block = row_zscore(be.xp, be.asarray(block))
            if fit:
                n = min(self.pca_components, block.shape[0], block.shape[1])
                self.pcas_.append(be.PCA(n_components=n, random_state=self.seed).fit(block))
            out.append(self.pcas_[i].transform(block))
        return be.xp.concatenate(out, axis=1).astype(be.xp.float32)

    def _base_learners(self, be: Backend):
        return (be.SVC(kernel="rbf", C=self.svm_c, gamma="scale", **be.svc_options),
                be.RandomForestClassifier(n_estimators=self.rf_trees, random_state=self.seed, **be.forest_options))

    def _base_outputs(self, be: Backend, svm, forest, Z):
        """SVM scores and forest probabilities, one column per class of the whole training set, even when a
        fold's training part lacked a class (its columns then say 'never this class')."""
        n = len(self.classes_)
        scores = be.asarray(svm.decision_function(Z))
        present = be.to_host(svm.classes_).astype(int)
        if scores.ndim == 1:
            scores = be.xp.stack([-scores, scores], axis=1)
        full_scores = be.xp.full((Z.shape[0], n), float(scores.min()) - 1.0, dtype=be.xp.float32)
        full_scores[:, present] = scores
        full_proba = be.xp.zeros((Z.shape[0], n), dtype=be.xp.float32)
        full_proba[:, be.to_host(forest.classes_).astype(int)] = be.asarray(forest.predict_proba(Z))
        return be.xp.concatenate([full_scores, full_proba], axis=1)

    def fit(self, X, y, groups=None):
        be = self._backend()
        y = np.asarray(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise AmlRapidsError(f"training rows hold a single class ({self.classes_[0]!r}); need at least two")
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        Z = self._reduce(be, X, fit=True)
        labels = be.xp.asarray(codes.astype(np.int32))
        folds = StratifiedGroupKFold(n_splits=self.folds, shuffle=True, random_state=self.seed)
        self.oof_ = None
        for train_idx, held_idx in folds.split(np.zeros(len(y)), codes, groups):
            train_idx, held_idx = be.xp.asarray(train_idx), be.xp.asarray(held_idx)
            svm, forest = self._base_learners(be)
            svm.fit(Z[train_idx], labels[train_idx])
            forest.fit(Z[train_idx], labels[train_idx])
            outputs = self._base_outputs(be, svm, forest, Z[held_idx])
            if self.oof_ is None:
                self.oof_ = be.xp.zeros((len(y), outputs.shape[1]), dtype=be.xp.float32)
            self.oof_[held_idx] = outputs
        self.meta_ = be.LogisticRegression(max_iter=2000).fit(self.oof_, labels)
        self.svm_, self.forest_ = self._base_learners(be)
        self.svm_.fit(Z, labels)
        self.forest_.fit(Z, labels)
        self.backend_ = be.name
        return self

    def predict_proba(self, X):
        be = get_backend(self.backend_)
        Z = self._reduce(be, X, fit=False)
        return be.to_host(self.meta_.predict_proba(self._base_outputs(be, self.svm_, self.forest_, Z)))

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]
