"""Seeded, reproducible splits that keep every group (a patient, or identical image content) in one part.

Every protocol keeps a group (a patient, or identical image content) in one part:
- ``patient``: train/val/test by patient, stratified by class (the default: no patient leaks).
- ``image``: train/val/test by image, stratified by class (the published 70/15/15 protocol, for comparison);
  byte-identical copies are one group, so a duplicated cell cannot sit in train and test.
- ``kfold``: grouped stratified k-fold by patient (scikit-learn's StratifiedGroupKFold).
- ``cohort``: the named test (and val) cohorts whole, the others train; without val cohorts a share of the
  training cohorts is validation, by patient (by image where the training cohorts have no patients). It asks
  whether a model holds at another site, which no split inside one cohort can tell.
- ``all``: every row train, for a model to deploy; nothing it could be tested on is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from ..config import SplitConfig
from ..errors import SplitError

PART_PRIORITY = ("train", "test", "val")


@dataclass
class SplitResult:
    table: pd.DataFrame
    column: str
    counts: pd.DataFrame
    missing: list[tuple[str, str]]
    record: dict = field(default_factory=dict)  # what the split decided beyond its config (the training cohorts)

    def counts_by_class(self) -> dict:
        """``{class: {"cells": {part: n}, "groups": {part: n}}}``, the JSON form of ``counts``."""
        return {str(label): {kind: {str(part): int(row[(kind, part)]) for part in self.counts[kind].columns}
                             for kind in ("cells", "groups")} for label, row in self.counts.iterrows()}


def _groups(table: pd.DataFrame, method: str) -> pd.Series:
    if method == "image":  # identical content stays in one part: same pixels (a re-saved copy), else same bytes
        if "pixels_sha256" not in table:
            return table["sha256"]
        return table["pixels_sha256"].where(table["pixels_sha256"].notna(), table["sha256"])
    if table["patient"].isna().any():
        n = int(table["patient"].isna().sum())
        raise SplitError(f"{n} cells have no patient id (layout <class>/<image>): a patient-grouped split is "
                         "impossible; use --method image, or index a <class>/<patient>/<image> tree or a CSV "
                         "with a patient column")
    if "cohort" not in table:
        return table["patient"]
    return table["cohort"].astype(str) + "/" + table["patient"].astype(str)  # same-named patients of two cohorts


def _group_labels(table: pd.DataFrame, groups: pd.Series) -> pd.DataFrame:
    """One row per group: its cell count and its class (the majority label of its cells)."""
    frame = pd.DataFrame({"group": groups.values, "label": table["label"].values})
    majority = frame.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    return pd.DataFrame({"label": majority, "cells": frame.groupby("group").size()})


def _assign_class(groups: pd.DataFrame, fractions: dict[str, float], rng: np.random.Generator) -> dict:
    """Give each part of one class at least one group where possible, then fill to the target cell counts."""
    order = list(groups.index[rng.permutation(len(groups))])
    parts = sorted(fractions, key=PART_PRIORITY.index)
    target = {p: fractions[p] * groups["cells"].sum() for p in parts}
    filled = dict.fromkeys(parts, 0)
    assignment = {}
    for part, group in zip(parts, order):
        assignment[group] = part
        filled[part] += groups.at[group, "cells"]
    for group in order[len(parts):]:
        part = max(parts, key=lambda p: (target[p] - filled[p]) / target[p])
        assignment[group] = part
        filled[part] += groups.at[group, "cells"]
    return assignment


def _counts(table: pd.DataFrame, column: str, groups: pd.Series) -> pd.DataFrame:
    frame = pd.DataFrame({"label": table["label"], column: table[column], "group": groups.values})
    cells = frame.pivot_table(index="label", columns=column, values="group", aggfunc="size", fill_value=0)
    grouped = frame.pivot_table(index="label", columns=column, values="group", aggfunc="nunique", fill_value=0)
    return pd.concat({"cells": cells, "groups": grouped}, axis=1)


def _fraction_split(table: pd.DataFrame, cfg: SplitConfig) -> SplitResult:
    return _by_fractions(table, cfg.fractions(), cfg.method, cfg.seed)


def _by_fractions(table: pd.DataFrame, fractions: dict[str, float], method: str, seed: int,
                  groups: pd.Series | None = None) -> SplitResult:
    groups = _groups(table, method) if groups is None else groups
    per_group = _group_labels(table, groups)
    rng = np.random.default_rng(seed)
    assignment: dict = {}
    missing = []
    for label in sorted(per_group["label"].unique()):
        members = per_group[per_group["label"] == label]
        assignment.update(_assign_class(members, fractions, rng))
        missing += [(label, part) for part in sorted(fractions, key=PART_PRIORITY.index)[len(members):]]
    out = table.copy()
    out["split"] = groups.map(assignment).values
    return SplitResult(out, "split", _counts(out, "split", groups), missing)


def _kfold_split(table: pd.DataFrame, cfg: SplitConfig) -> SplitResult:
    groups = _groups(table, "patient")
    per_group = _group_labels(table, groups)
    short = per_group.groupby("label").size()
    missing = [(label, f"{cfg.folds - n} of {cfg.folds} folds") for label, n in short.items() if n < cfg.folds]
    if len(per_group) < cfg.folds:
        raise SplitError(f"{len(per_group)} patients cannot fill {cfg.folds} folds")
    folds = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    out = table.copy()
    out["fold"] = -1
    for k, (_, test_idx) in enumerate(folds.split(np.zeros(len(out)), out["label"], groups)):
        out.loc[out.index[test_idx], "fold"] = k
    return SplitResult(out, "fold", _counts(out, "fold", groups), missing)


def _check_cohorts(table: pd.DataFrame, cfg: SplitConfig) -> None:
    have = sorted(map(str, table["cohort"].unique()))
    unknown = sorted(set(cfg.test_cohorts + cfg.val_cohorts) - set(have))
    if unknown:
        raise SplitError(f"no cohort {', '.join(map(repr, unknown))} in this manifest; its cohorts are "
                         f"{', '.join(have)} (index names them: index.cohort, a CSV's cohort column, or the folder)")
    if not set(have) - set(cfg.test_cohorts + cfg.val_cohorts):
        raise SplitError(f"every cohort ({', '.join(have)}) is named for test or val: none is left to train on")


def _cohort_groups(table: pd.DataFrame) -> pd.Series:
    """Each row's group in a cohort split: its cohort and patient, or (a cell without one) its content."""
    return table["cohort"].astype(str) + "/" + table["patient"].fillna(_groups(table, "image")).astype(str)


def _within_cohort_groups(table: pd.DataFrame) -> str:
    """How the training cohorts' val share is grouped, in words: by patient, by image, or each cell by its
    patient where it has one and else by its image (cohorts with and without patients trained together)."""
    has = table["patient"].notna()
    return "patient" if has.all() else "image" if not has.any() else "patient, else image"


def _cohort_split(table: pd.DataFrame, cfg: SplitConfig) -> SplitResult:
    _check_cohorts(table, cfg)
    cohort = table["cohort"].astype(str)
    held = cohort.isin(cfg.test_cohorts) | cohort.isin(cfg.val_cohorts)
    pool = table[~held]
    within = _within_cohort_groups(pool)
    if cfg.val_cohorts or cfg.val == 0:
        inside = pool.assign(split="train")
        missing: list[tuple[str, str]] = []
    else:
        inside_result = _by_fractions(pool, {"train": 1 - cfg.val, "val": cfg.val}, within, cfg.seed,
                                      _cohort_groups(pool))
        inside, missing = inside_result.table, inside_result.missing
    out = table.copy()
    out.loc[pool.index, "split"] = inside["split"]
    out.loc[cohort.isin(cfg.test_cohorts), "split"] = "test"
    out.loc[cohort.isin(cfg.val_cohorts), "split"] = "val"
    untrained = sorted(set(out["label"]) - set(out.loc[out["split"] == "train", "label"]))
    if untrained:
        where = out[out["label"].isin(untrained)].groupby("label")["cohort"].unique()
        raise SplitError("no training cells would be left of " + "; ".join(
            f"class {label} (only in held-out cohort(s) {', '.join(map(str, c))})" for label, c in where.items())
            + ". Train on a cohort that has them, or leave them out of the manifest")
    groups = _cohort_groups(table)
    train_cohorts = sorted(set(cohort[~held]))
    record = {"train_cohorts": train_cohorts, "val_within": None if cfg.val_cohorts or cfg.val == 0 else within}
    return SplitResult(out, "split", _counts(out, "split", groups), missing, record)


def _all_split(table: pd.DataFrame) -> SplitResult:
    out = table.assign(split="train")
    groups = _cohort_groups(out)
    return SplitResult(out, "split", _counts(out, "split", groups), [],
                       {"train_cohorts": sorted(map(str, out["cohort"].unique()))})


SPLITTERS = {"kfold": _kfold_split, "cohort": _cohort_split, "all": lambda table, cfg: _all_split(table)}


def make_split(table: pd.DataFrame, cfg: SplitConfig) -> SplitResult:
    """Add a ``split`` (or ``fold``) column; raise SplitError, showing the best feasible split, when a class
    has too few groups to appear in every part (unless ``cfg.allow_incomplete``)."""
    table = table.drop(columns=[c for c in ("split", "fold") if c in table.columns])
    result = SPLITTERS.get(cfg.method, _fraction_split)(table, cfg)
    if result.missing and not cfg.allow_incomplete:
        unit = "images" if "image" in (cfg.method, result.record.get("val_within")) else "patients"
        lacking = "; ".join(f"{label} missing from {part}" for label, part in result.missing)
        raise SplitError(f"too few {unit} for a {cfg.method} split with every class in every part: {lacking}.\n"
                         f"Best feasible split (--allow-incomplete, or --set split.allow_incomplete=true, writes it):\n{result.counts.to_string()}")
    return result


def groups_in_several_parts(table: pd.DataFrame, column: str, group_column: str = "patient") -> list[str]:
    """Groups whose cells sit in more than one part: empty for every split this module makes."""
    parts = table.groupby(group_column)[column].nunique()
    return sorted(map(str, parts[parts > 1].index))
