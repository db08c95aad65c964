"""The drift plot: left, both cohorts' cells in the first two PCA components of the first backbone; right, each
backbone's domain AUROC against the threshold that flags drift. Written as PNG and SVG, as every plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..evaluate.plots import TEXT_RC, save_figure  # noqa: E402
from .drift import Drift  # noqa: E402

COLOURS = {"reference": "tab:blue", "new": "tab:orange"}


def _cohort_words(cohort: dict, shown: int) -> str:
    names = ", ".join(cohort["cohorts"][:3]) + (" ..." if len(cohort["cohorts"]) > 3 else "")
    return f"{names} ({shown:,} of {cohort['cells']:,} cells)"


def _scatter(ax, drift: Drift) -> None:
    scatter = drift.scatter
    size = 12 if len(scatter.xy) < 2000 else 4  # a few cells stay visible, thousands do not hide each other
    for side, is_new in (("reference", False), ("new", True)):
        xy = scatter.xy[scatter.is_new == is_new]
        ax.scatter(xy[:, 0], xy[:, 1], s=size, alpha=0.4, color=COLOURS[side], linewidths=0,
                   label=f"{side}: {_cohort_words(getattr(drift, side), len(xy))}")
    ax.set_xlabel(f"PC 1 ({scatter.explained[0]:.0%} of the variance)")
    ax.set_ylabel(f"PC 2 ({scatter.explained[1]:.0%})")
    ax.set_title(f"{scatter.backbone}: both cohorts in one PCA (row z-score)", fontsize=10)
    legend = ax.legend(fontsize=8, loc="best", markerscale=3)
    for handle in legend.legend_handles:
        handle.set_alpha(1)


def _aurocs(ax, drift: Drift) -> None:
    names = list(drift.backbones)
    values = np.array([drift.backbones[b].auroc for b in names])
    colours = ["tab:red" if v >= drift.threshold else "tab:gray" for v in values]
    bars = ax.bar(range(len(names)), values, color=colours, width=0.6)
    ax.set_xlim(-0.75, len(names) - 0.25)
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=9, padding=2)
    ax.axhline(drift.threshold, color="tab:red", linestyle="--", linewidth=1,
               label=f"flags drift at >= {drift.threshold:g}")
    ax.axhline(0.5, color="0.4", linestyle=":", linewidth=1, label="0.5: cohorts alike")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", rotation_mode="anchor")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("domain classifier AUROC (out of fold, patient-grouped)")
    ax.set_title("how well each backbone's features tell the cohorts apart", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")


@plt.rc_context(TEXT_RC)
def plot_drift(drift: Drift, out: Path) -> list[Path]:
    """drift.png (and .svg): the cohorts' cells in PCA space, and each backbone's AUROC with the threshold."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [1.25, 1]})
    _scatter(left, drift)
    _aurocs(right, drift)
    backbone, auroc = drift.worst
    verdict = "DRIFT FLAGGED" if drift.flagged else "no drift flagged" if drift.judged else "NOT JUDGED (too few cells)"
    fig.suptitle(f"{verdict}: new {drift.new['store']} against reference {drift.reference['store']}\n"
                 f"highest domain AUROC {auroc:.3f} ({backbone}); flagged at >= {drift.threshold:g}",
                 fontsize=10, color="tab:red" if drift.flagged else "black")
    fig.tight_layout()
    return save_figure(fig, out)
