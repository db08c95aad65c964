"""Paired comparison of a study's variants on the same cells: one results table, McNemar's test of every
variant against the reference (and at patient level where cells have patients), Holm-corrected across the
pairs, and one ROC figure with every variant's macro curve.

McNemar's test counts the discordant cells: b, those the reference gets right and the other variant wrong, and
c, the reverse. With b + c < 25 the exact binomial test decides (the chi-square approximation is poor there);
otherwise the chi-square statistic without continuity correction, the form the paper reports. Both are written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from ..errors import ConfigError
from ..evaluate.metrics import labels_belong_to_patients, patient_keys
from ..evaluate.plots import plot_macro_rocs
from ..outputs import atomic_write_text, read_json

EXACT_BELOW = 25  # b + c under this: the exact binomial test


@dataclass
class VariantResult:
    """One variant's report (metrics.json) and its per-cell predictions (predictions.csv)."""

    name: str
    metrics: dict
    predictions: pd.DataFrame

    @property
    def classes(self) -> list[str]:
        return [c.removeprefix("p_") for c in self.predictions.columns if c.startswith("p_")]


def read_variant(name: str, report_dir: Path) -> VariantResult:
    return VariantResult(name, read_json(report_dir / "metrics.json"),
                         pd.read_csv(report_dir / "predictions.csv", dtype={"cell_id": str, "patient": str,
                                                                           "cohort": str, "label": str,
                                                                           "predicted": str},
                                     keep_default_na=False))


def aligned(results: list[VariantResult]) -> list[VariantResult]:
    """Every variant's predictions in one cell order; refused unless all hold exactly the same cells."""
    cells = sorted(results[0].predictions["cell_id"])
    for result in results[1:]:
        if sorted(result.predictions["cell_id"]) != cells:
            raise ConfigError(f"variants {results[0].name!r} and {result.name!r} were evaluated on different cells; "
                              "a paired test needs the same cells (were they split differently?)")
    return [VariantResult(r.name, r.metrics, r.predictions.set_index("cell_id").loc[cells].reset_index())
            for r in results]


def mcnemar_test(reference_correct: np.ndarray, other_correct: np.ndarray) -> dict:
    """Discordant counts and both forms of McNemar's test for two paired lists of right/wrong."""
    b = int((reference_correct & ~other_correct).sum())
    c = int((~reference_correct & other_correct).sum())
    table = [[int((reference_correct & other_correct).sum()), b], [c, int((~reference_correct & ~other_correct).sum())]]
    exact = mcnemar(table, exact=True)
    chi2 = mcnemar(table, exact=False, correction=False) if b + c else None  # no discordant cells: no statistic
    use_exact = b + c < EXACT_BELOW
    return {"n": len(reference_correct), "b": b, "c": c, "exact_p": float(exact.pvalue),
            "chi2": float(chi2.statistic) if chi2 else None, "chi2_p": float(chi2.pvalue) if chi2 else None,
            "test": "exact binomial" if use_exact else "chi-square, no continuity correction",
            "p": float(exact.pvalue if use_exact else chi2.pvalue)}


def _patient_correct(result: VariantResult) -> pd.Series:
    """Per patient (cohort/name), whether the mean of its cells' probabilities picks its label."""
    cells = result.predictions
    columns = [f"p_{c}" for c in result.classes]
    means = cells[columns].groupby(patient_keys(cells)).mean()
    labels = cells.groupby(patient_keys(cells))["label"].first()
    picked = np.asarray(result.classes)[means.to_numpy().argmax(axis=1)]
    return pd.Series(picked == labels.loc[means.index].to_numpy(), index=means.index)


def mcnemar_table(results: list[VariantResult], reference: str) -> pd.DataFrame:
    """McNemar's test of each variant against the reference, at cell level and (where every cell has a patient)
    at patient level, with Holm-adjusted p values across the variants at each level."""
    by_name = {r.name: r for r in results}
    ref = by_name[reference]
    levels = {"cells": lambda r: (r.predictions["predicted"] == r.predictions["label"]).to_numpy()}
    if (ref.predictions["patient"] != "").all() and labels_belong_to_patients(ref.predictions):
        levels["patients"] = lambda r: _patient_correct(r).sort_index().to_numpy()
    rows = []
    for level, correct in levels.items():
        part = [{"level": level, "variant": r.name, "reference": reference, **mcnemar_test(correct(ref), correct(r))}
                for r in results if r.name != reference]
        if part:
            adjusted = multipletests([row["p"] for row in part], method="holm")[1]
            for row, p in zip(part, adjusted):
                row["p_holm"] = float(p)
        rows += part
    return pd.DataFrame(rows)


def results_table(results: list[VariantResult]) -> pd.DataFrame:
    """One line per variant: the metrics a paper reports, with their bootstrap 95% intervals where computed."""
    rows = []
    for r in results:
        row = {"variant": r.name}
        for level, prefix in (("cell_level", ""), ("patient_level", "patient_")):
            if level not in r.metrics:
                continue
            m = r.metrics[level]
            row.update({f"{prefix}n": m["n"], f"{prefix}accuracy": m["accuracy"],
                        **{f"{prefix}macro_{k}": m["macro"][k] for k in ("precision", "sensitivity", "specificity",
                                                                          "f1")},
                        f"{prefix}macro_auc": m["macro_auc"]})
            for key, (low, high) in m["ci95"].items():
                row[f"{prefix}{key}_ci95"] = f"{low:.3f}-{high:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """The results table a person reads: each headline metric with its interval in one column."""
    out = pd.DataFrame({"variant": table["variant"], "cells": table["n"]})
    for prefix, level in (("", "cell"), ("patient_", "patient")):
        for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro F1"), ("macro_auc", "macro AUC")):
            if f"{prefix}{key}" not in table:
                continue
            ci = table.get(f"{prefix}{key}_ci95")
            out[f"{level} {label} (95% CI)"] = [
                "undefined" if pd.isna(v) else f"{v:.3f}" + (f" ({c})" if isinstance(c, str) else "")
                for v, c in zip(table[f"{prefix}{key}"], ci if ci is not None else [None] * len(table))]
        if f"{prefix}n" in table and prefix:
            out.insert(2, "patients", table[f"{prefix}n"])
    return out


COMPARISON_FILES = ("results.csv", "results.md", "mcnemar.csv", "roc.png", "roc.svg")  # what write_comparison writes


def write_comparison(results: list[VariantResult], reference: str, out: Path, title: str) -> dict:
    """results.csv / results.md, mcnemar.csv and roc.png / roc.svg for variants evaluated on the same cells."""
    results = aligned(results)
    table, tests = results_table(results), mcnemar_table(results, reference)
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    atomic_write_text(out / "mcnemar.csv", tests.to_csv(index=False))
    markdown = [f"# {title}", "", summary_table(table).to_markdown(index=False), "",
                f"McNemar's test against {reference} (b: cells {reference} gets right and the variant wrong; c: the "
                f"reverse; exact binomial when b + c < {EXACT_BELOW}, else chi-square without continuity "
                "correction; p_holm: Holm-adjusted across variants)", "",
                tests.to_markdown(index=False, floatfmt=".4g") if len(tests) else "(no other variants)", ""]
    atomic_write_text(out / "results.md", "\n".join(markdown))
    curves = {r.name: (r.predictions["label"].to_numpy(), r.predictions[[f"p_{c}" for c in r.classes]].to_numpy(),
                       r.classes) for r in results}
    plot_macro_rocs(curves, title, out / "roc.png")
    return {"results": table.to_dict(orient="records"), "mcnemar": tests.to_dict(orient="records")}
