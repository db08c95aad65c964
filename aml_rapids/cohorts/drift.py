"""Drift between a reference cohort (a model's training store, say) and a new cohort: do the new cells look
unlike those the model learnt from? (docs/drift.md)

Per backbone, a seeded sample of each store's original cells is row-z-scored as the classifier does and projected
on one PCA fitted on both samples. In that space:

- a domain classifier (logistic regression) learns to tell the two cohorts apart. Its out-of-fold AUROC, on folds
  that keep each patient's cells together, says how separable they are: 0.5 for cohorts alike, 1 for cohorts
  that any cell tells apart. It is an effect size, comparable across cohort sizes, and it flags drift at
  ``drift.auroc_threshold``.
- a kernel two-sample test (unbiased MMD² under an RBF kernel whose bandwidth is the median distance) gives a
  permutation p-value. It is reported and never flags: with thousands of cells it is tiny for any real
  difference, however small, and it takes the cells of one patient for independent draws.

With a model, the shift of its predicted class mix is reported too (``class_mix``), and always the colour of the
segmented cells (``colour``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.distance import pdist
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..classify.data import feature_blocks, load_features, select_rows
from ..classify.io import seen_in_training
from ..classify.model import row_zscore
from ..config import DriftConfig
from ..data.manifest import same_content
from ..errors import DataError
from ..evaluate.metrics import patient_keys
from ..features.store import FeatureStore, StoreMismatch, feature_identity, identity_differences
from ..outputs import atomic_write_text
from .colour import ColourDrift, compare_colour, store_colour

MMD_CELLS = 1000  # cells of each cohort in the MMD test: its kernel matrix grows with the square of the count
FEWEST_JUDGED = 20  # cells of a cohort below which its AUROC says nothing either way: no verdict is given
SIDES = ("reference", "new")


@dataclass
class BackboneDrift:
    auroc: float  # the domain classifier's, out of fold
    folds: int
    mmd2: float  # unbiased MMD² in the PCA space
    mmd_p: float  # its permutation p-value
    components: int  # of the PCA both were computed in
    explained_variance: float  # the share of the pooled cells' variance those components hold
    cells: dict[str, int]  # cells of each cohort in the domain classifier
    mmd_cells: dict[str, int]  # ... and in the MMD test


@dataclass
class ClassMix:
    reference: dict[str, float]  # each class's share of the cells the model called it
    new: dict[str, float]
    total_variation: float  # half the summed absolute differences of the shares: 0 alike, 1 disjoint
    cells: dict[str, int]
    reference_cells: str  # which of the reference's cells were predicted, in words


@dataclass
class Scatter:
    """The first two PCA components of every compared cell of one backbone, for the drift plot."""

    backbone: str
    xy: np.ndarray  # (cells, 2)
    is_new: np.ndarray  # (cells,) bool
    explained: tuple[float, float]  # each component's share of the variance


@dataclass
class Drift:
    reference: dict  # store, cohorts, usable original cells
    new: dict
    backbones: dict[str, BackboneDrift]
    threshold: float  # an AUROC at or above it flags drift
    flagged: bool
    judged: bool = True  # False: a cohort has too few cells for any verdict (flagged is then False, and means nothing)
    class_mix: ClassMix | None = None
    colour: ColourDrift | None = None
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    scatter: Scatter | None = field(default=None, repr=False)

    @property
    def worst(self) -> tuple[str, float]:
        """The backbone whose cohorts are easiest to tell apart, and its AUROC."""
        name = max(self.backbones, key=lambda b: self.backbones[b].auroc)
        return name, self.backbones[name].auroc

    def to_json(self) -> dict:
        """What drift.json holds: everything but the plot's coordinates."""
        data = dataclasses.asdict(dataclasses.replace(self, scatter=None))
        del data["scatter"]
        backbone, auroc = self.worst
        return {**data, "worst": {"backbone": backbone, "auroc": auroc}}


def comparable_backbones(reference: FeatureStore, new: FeatureStore, backbones: list[str] | None = None) -> list[str]:
    """The backbones to compare (``backbones``, or every one of the reference's), refused (StoreMismatch) unless
    both stores hold them, made the same way (networks, weights, image size, segmentation, dtype): features made
    otherwise differ whatever the cells, and would always look like drift. Without ``backbones`` the stores must
    hold the same ones."""
    wanted = list(backbones or reference.backbones)
    lacking = [f"{store.path} lacks {', '.join(missing)}" for store in (reference, new)
               if (missing := [b for b in wanted if b not in store.backbones])]
    extra = [b for b in new.backbones if b not in reference.backbones] if backbones is None else []
    if extra:
        lacking.append(f"{reference.path} lacks {', '.join(extra)}")
    if lacking:
        raise StoreMismatch(f"stores {reference.path} and {new.path} hold different backbones ({'; '.join(lacking)}); "
                            "drift compares the same backbones' features: extract both with one config")
    differs = identity_differences(feature_identity(reference.meta, wanted), feature_identity(new.meta, wanted))
    if differs:
        raise StoreMismatch(f"stores {reference.path} and {new.path} hold features made otherwise (they differ in "
                            f"{', '.join(differs)}), which differ whatever the cells: extract both with one config")
    return wanted


def training_cohorts(store: FeatureStore) -> list[str]:
    """The cohorts of a store's train split: what a model trained on the store learnt from."""
    _, rows = select_rows(store, None, originals_only=True)
    return sorted(map(str, rows.loc[rows["split"] == "train", "cohort"].unique()))


def plain_cells(rows: pd.DataFrame, cohorts: list[str] | None, side: str) -> tuple[np.ndarray, list[str]]:
    """Which rows (of ``cohorts``, if given) to compare: the un-augmented ones. A training row, original or copy,
    is warped and jittered, so it differs from any new cell by the augmentation itself; only when there are no
    others (a model trained on every cell) are they compared, said in a note."""
    keep = np.ones(len(rows), bool) if cohorts is None else rows["cohort"].isin(cohorts).to_numpy()
    plain = keep & ~rows["augment"].to_numpy(bool)
    if plain.any() or not keep.any():
        return plain, []
    return keep, [f"the {side} store has no un-augmented cells" + (f" of {', '.join(cohorts)}" if cohorts else "")
                  + ": its augmented training cells are compared, so the AUROC also measures the augmentation"]


def cohort_sample(store: FeatureStore, max_cells: int, rng: np.random.Generator,
                  among: np.ndarray | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """A seeded sample of at most ``max_cells`` of the store's usable original cells (of those ``among`` marks, a
    mask over them, if given): a mask over the store's rows, and their rows in store order."""
    keep, rows = select_rows(store, None, originals_only=True)
    candidates = np.arange(len(rows)) if among is None else np.flatnonzero(among)
    chosen = np.sort(rng.choice(candidates, min(max_cells, len(candidates)), replace=False))
    sample = np.zeros_like(keep)
    sample[np.flatnonzero(keep)[chosen]] = True
    return sample, rows.iloc[chosen].reset_index(drop=True)


def domain_groups(reference: pd.DataFrame, new: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Fold groups of the domain classifier, and notes: each cohort's patients (by cohort and name), a cell
    without a patient its own group. A cohort of fewer than two groups is grouped by cell, said in a note: no
    fold could hold it out and still train on it."""
    groups, notes = [], []
    for side, rows in zip(SIDES, (reference, new)):
        cells = ("cell " + rows["cell_id"].astype(str)).to_numpy()
        keys = np.where(rows["patient"] != "", patient_keys(rows), cells)
        if len(set(keys)) < 2 and len(rows) > 1:
            keys = cells
            notes.append(f"the {side} cohort has a single patient, so its cells are folded one by one: the AUROC "
                         "then also measures how unlike that one patient is to the other cohort's patients, not "
                         "only how unlike the cohort is")
        groups.append(np.char.add(f"{side}/", keys.astype(str)))
    return np.concatenate(groups), notes


def fold_count(groups: np.ndarray, is_new: np.ndarray, wanted: int) -> tuple[int, list[str]]:
    """The domain classifier's folds: ``wanted``, or as many as the cohort with fewer groups has (noted)."""
    fewest = min(len(set(groups[is_new])), len(set(groups[~is_new])))
    if fewest < 2:
        raise DataError(f"too few cells to compare: a cohort has {fewest} (drift needs at least 2 in each)")
    if fewest >= wanted:
        return wanted, []
    return fewest, [f"the domain classifier used {fewest} folds, not drift.folds {wanted}: a cohort has only "
                    f"{fewest} patients (or cells)"]


def pooled_pca(reference: np.ndarray, new: np.ndarray, components: int) -> tuple[np.ndarray, PCA]:
    """Both cohorts' features, each row z-scored as the classifier does, in the components of one PCA fitted on
    them together (at most as many as rows and features allow)."""
    pooled = row_zscore(np, np.concatenate([reference, new]))
    pca = PCA(min(components, *pooled.shape), random_state=0)
    return pca.fit_transform(pooled), pca


def domain_auroc(Z: np.ndarray, is_new: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> float:
    """ROC AUC of a logistic regression's out-of-fold probability that a cell is the new cohort's, on folds that
    never split a group (a patient), so it tells cohorts apart, not patients it has seen."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
    split = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(classifier, Z, is_new, groups=groups, cv=split, method="predict_proba")[:, 1]
    return float(roc_auc_score(is_new, proba))


def mmd_test(reference: np.ndarray, new: np.ndarray, permutations: int,
             rng: np.random.Generator) -> tuple[float, float]:
    """Unbiased MMD² between two samples under an RBF kernel whose bandwidth is the pooled cells' median
    distance, and its permutation p-value (the observed split counted as one of the permutations). One kernel
    matrix serves every permutation: each is a vector of sides."""
    pooled = np.concatenate([reference, new])
    median = float(np.median(pdist(pooled, "sqeuclidean"))) or 1.0  # all cells alike: any bandwidth will do
    kernel = rbf_kernel(pooled, gamma=1.0 / (2.0 * median))
    observed = np.arange(len(pooled)) >= len(reference)
    sides = np.vstack([observed, rng.permuted(np.tile(observed, (permutations, 1)), axis=1)])
    statistics = _mmd2(kernel, sides)
    return float(statistics[0]), float((1 + np.sum(statistics[1:] >= statistics[0])) / (1 + permutations))


def _mmd2(kernel: np.ndarray, is_new: np.ndarray) -> np.ndarray:
    """Unbiased MMD² for each row of ``is_new`` (which cells are the second sample); the kernel's diagonal is 1."""
    y = is_new.T.astype(kernel.dtype)  # (cells, splits)
    m, n = len(y) - y[:, 0].sum(), y[:, 0].sum()
    k_y = kernel @ y
    k_x = kernel.sum(axis=1, keepdims=True) - k_y
    xx, yy, xy = ((1 - y) * k_x).sum(axis=0), (y * k_y).sum(axis=0), ((1 - y) * k_y).sum(axis=0)
    return (xx - m) / (m * (m - 1)) + (yy - n) / (n * (n - 1)) - 2 * xy / (m * n)


def compare_backbone(reference: np.ndarray, new: np.ndarray, groups: np.ndarray, folds: int, cfg: DriftConfig,
                     rng: np.random.Generator) -> tuple[BackboneDrift, np.ndarray, PCA]:
    """One backbone's domain AUROC and MMD test, with the cells in its PCA space (for the plot)."""
    Z, pca = pooled_pca(reference, new, cfg.pca_components)
    is_new = np.arange(len(Z)) >= len(reference)
    auroc = domain_auroc(Z, is_new, groups, folds, cfg.seed)
    picks = [rng.choice(np.flatnonzero(is_new == side), min(MMD_CELLS, int((is_new == side).sum())), replace=False)
             for side in (False, True)]
    mmd2, p = mmd_test(Z[picks[0]], Z[picks[1]], cfg.permutations, rng)
    result = BackboneDrift(auroc, folds, mmd2, p, pca.n_components_, float(pca.explained_variance_ratio_.sum()),
                           dict(zip(SIDES, (len(reference), len(new)))), dict(zip(SIDES, map(len, picks))))
    return result, Z, pca


def _describe(store: FeatureStore, among: np.ndarray) -> dict:
    _, rows = select_rows(store, None, originals_only=True)
    rows = rows[among]
    return {"store": str(store.path), "cohorts": sorted(map(str, rows["cohort"].unique())), "cells": len(rows),
            "splits": sorted(map(str, rows["split"].unique()))}


def measure_drift(reference: FeatureStore, new: FeatureStore, cfg: DriftConfig, backbones: list[str],
                  class_mix: ClassMix | None = None, reference_cohorts: list[str] | None = None) -> Drift:
    """Compare the new cohort's un-augmented cells with the reference's (of ``reference_cohorts``, if given: a
    model's training cohorts, not the cohorts its store holds for testing) on ``backbones`` (as
    ``comparable_backbones`` gives them), and their colour; ``class_mix``, a model's, is carried into the result."""
    rng = np.random.default_rng(cfg.seed)
    _, reference_all = select_rows(reference, None, originals_only=True)
    _, new_all = select_rows(new, None, originals_only=True)
    reference_plain, notes = plain_cells(reference_all, reference_cohorts, "reference")
    new_plain, new_notes = plain_cells(new_all, None, "new")
    notes += new_notes
    shared = same_content(reference_all, set(new_all["sha256"]) | set(new_all["pixels_sha256"]) - {""}).to_numpy()
    if not (reference_plain & ~shared).any():
        raise DataError(f"every usable cell of {reference.path} compared is also in {new.path}: no reference is "
                        "left to compare with")
    if (reference_plain & shared).any():  # a cell on both sides is no evidence of either cohort, and drags the AUROC below 0.5
        notes.append(f"{int((reference_plain & shared).sum()):,} cells of the reference are also in the new store "
                     "(same content): left out of the reference")
    reference_among, new_among = reference_plain & ~shared, new_plain
    new_keep, new_rows = cohort_sample(new, cfg.max_cells, rng, new_among)
    reference_keep, reference_rows = cohort_sample(reference, cfg.max_cells, rng, reference_among)
    groups, group_notes = domain_groups(reference_rows, new_rows)
    notes += group_notes
    is_new = np.arange(len(groups)) >= len(reference_rows)
    folds, folds_note = fold_count(groups, is_new, cfg.folds)
    results, scatter = {}, None
    for backbone in backbones:
        results[backbone], Z, pca = compare_backbone(load_features(reference, [backbone], reference_keep),
                                                     load_features(new, [backbone], new_keep), groups, folds, cfg, rng)
        if scatter is None:
            scatter = Scatter(backbone, Z[:, :2], is_new, tuple(map(float, pca.explained_variance_ratio_[:2])))
    capped = sorted({r.components for r in results.values() if r.components < cfg.pca_components})
    if capped:
        notes.append(f"PCA kept {', '.join(map(str, capped))} components, not drift.pca_components "
                     f"{cfg.pca_components}: no more rows or features")
    colour = compare_colour(store_colour(reference, cfg.colour_cells, cfg.seed, reference_among),
                            store_colour(new, cfg.colour_cells, cfg.seed, new_among))
    notes += folds_note + colour.notes()
    if class_mix is not None:
        notes.append(f"the reference's predicted class mix is of {class_mix.reference_cells}")
    judged = min(len(reference_rows), len(new_rows)) >= FEWEST_JUDGED
    if not judged:
        notes.insert(0, f"no verdict: {min(len(reference_rows), len(new_rows))} cells on one side, under "
                        f"{FEWEST_JUDGED}; an AUROC on so few says nothing either way")
    flagged = judged and any(r.auroc >= cfg.auroc_threshold for r in results.values())
    return Drift(_describe(reference, reference_among), _describe(new, new_among), results, cfg.auroc_threshold, flagged,
                 judged, class_mix, colour, notes, {**cfg.model_dump(), "mmd_cells": MMD_CELLS}, scatter)


def predicted_classes(model, info: dict, store: FeatureStore, keep: np.ndarray) -> np.ndarray:
    """The class the model calls each kept row of the store."""
    proba = np.concatenate([model.predict_proba(X) for X in feature_blocks(store, list(info["backbones"]), keep)])
    return np.asarray(model.classes_)[proba.argmax(axis=1)]


def class_mix(model, info: dict, model_dir: Path, reference: FeatureStore, new: FeatureStore, cfg: DriftConfig,
              new_predicted: np.ndarray | None = None) -> ClassMix:
    """The share of each class the model calls, in a seeded sample of each cohort (or ``new_predicted``, the new
    cells' calls already made), and how far the two mixes lie apart. The reference's sample is drawn from the
    cells the model did not train on (by content) where it has some: on its own training cells a model's calls
    mirror their labels."""
    rng = np.random.default_rng(cfg.seed)
    _, rows = select_rows(reference, None, originals_only=True)
    cohorts = training_cohorts(reference) or sorted(map(str, rows["cohort"].unique()))
    unseen = ~seen_in_training(rows, model_dir, info) & rows["cohort"].isin(cohorts).to_numpy()
    words = (f"cells of its training cohorts the model did not train on ({int(unseen.sum()):,} of {len(rows):,})"
             if unseen.any() else
             f"cells the model trained on (all {len(rows):,} of the store's: it has no others)")
    reference_keep, _ = cohort_sample(reference, cfg.max_cells, rng, unseen if unseen.any() else None)
    if new_predicted is None:
        new_predicted = predicted_classes(model, info, new, cohort_sample(new, cfg.max_cells, rng)[0])
    classes = [str(c) for c in model.classes_]
    mixes = [pd.Series(calls).astype(str).value_counts(normalize=True).reindex(classes, fill_value=0.0)
             for calls in (predicted_classes(model, info, reference, reference_keep), new_predicted)]
    distance = 0.5 * float((mixes[0] - mixes[1]).abs().sum())
    return ClassMix(*(mix.astype(float).to_dict() for mix in mixes), distance,
                    {"reference": int(reference_keep.sum()), "new": len(new_predicted)}, words)


def write_drift(drift: Drift, out: Path) -> Path:
    """drift.json in ``out``."""
    return atomic_write_text(Path(out) / "drift.json", json.dumps(drift.to_json(), indent=2))
