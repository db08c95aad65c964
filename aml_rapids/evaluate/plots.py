"""Plots a person reads: the confusion matrix and one-vs-rest ROC curves.

They are for judging a classifier by eye, so each one carries its own numbers: the confusion matrix shows the count
and the share of the true class in every cell and is coloured by that share (a small class is as visible as a big
one); the ROC plot names each class's positives and AUC and adds the macro-average curve. Each plot is written
twice: a PNG to look at and an SVG for papers, whose text stays text (editable, searchable).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402
from sklearn.metrics import auc, confusion_matrix, roc_curve  # noqa: E402

from ..outputs import atomic_write  # noqa: E402

# Class names and paths are text, not TeX; SVG text stays text so a paper's author can edit it.
TEXT_RC = {"text.parse_math": False, "svg.fonttype": "none", "svg.hashsalt": "aml-rapids"}


def save_figure(fig, out: Path, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``out`` (PNG at ``dpi``) and the SVG beside it, each atomically, close it, return both."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    svg = out.with_suffix(".svg")
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
        atomic_write(svg, lambda tmp: fig.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None}))
    finally:
        plt.close(fig)
    return [out, svg]


@plt.rc_context(TEXT_RC)
def plot_confusion(y_true, y_pred, classes, title: str, out: Path) -> list[Path]:
    """Confusion matrix, each cell the count and the share of its true class (row), coloured by that share."""
    classes = list(classes)
    counts = confusion_matrix(y_true, y_pred, labels=classes)
    n = counts.sum(axis=1)
    share = np.zeros(counts.shape, dtype=float)
    np.divide(counts, n[:, None], out=share, where=n[:, None] > 0)
    k = len(classes)
    side = max(4.0, 0.95 * k + 2.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    cmap = plt.get_cmap("Blues").with_extremes(bad="0.92")  # a class with no true cells: grey, not 0%
    image = ax.imshow(np.ma.masked_array(share, np.repeat(n[:, None] == 0, k, axis=1)), cmap=cmap, vmin=0.0,
                      vmax=1.0)
    fontsize = 10 if k <= 8 else 8 if k <= 14 else 6
    for r in range(k):
        for c in range(k):
            if n[r] == 0:
                text, colour = "–", "0.4"
            else:
                text, colour = f"{counts[r, c]}\n{share[r, c]:.1%}", "white" if share[r, c] > 0.5 else "black"
            ax.text(c, r, text, ha="center", va="center", color=colour, fontsize=fontsize, linespacing=1.3)
    ax.set_xticks(range(k), [str(c) for c in classes], rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), [f"{c} (n={m})" for c, m in zip(classes, n)])
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(k + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(k + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xlabel("predicted class", fontsize=11)
    ax.set_ylabel("true class (n)", fontsize=11)
    ax.set_title(title, fontsize=11, wrap=True)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("share of the true class", fontsize=10)
    bar.ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    return save_figure(fig, out)


def class_curves(y_true, proba, classes) -> list[dict]:
    """Per class, its one-vs-rest ROC curve (``fpr``, ``tpr``, ``auc``, ``n`` positives), or where it has no
    positives or no negatives, which of the two it lacks (``missing``)."""
    y_true, proba = np.asarray(y_true), np.asarray(proba)
    out = []
    for i, name in enumerate(classes):
        positives = y_true == name
        n_pos = int(positives.sum())
        if n_pos == 0 or n_pos == len(positives):
            out.append({"name": name, "n": n_pos, "missing": "positives" if n_pos == 0 else "negatives"})
            continue
        fpr, tpr, _ = roc_curve(positives, proba[:, i])
        out.append({"name": name, "n": n_pos, "fpr": fpr, "tpr": tpr, "auc": auc(fpr, tpr)})
    return out


def macro_curve(curves: list[dict]) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The macro average of class curves: mean true positive rate over a common false positive grid, and the
    mean of the class AUCs (as ``macro_auc`` in metrics.json); None when no class has a curve."""
    drawn = [c for c in curves if "auc" in c]
    if not drawn:
        return None
    grid = np.unique(np.concatenate([np.linspace(0.0, 1.0, 201)] + [c["fpr"] for c in drawn]))
    mean_tpr = np.mean([np.interp(grid, c["fpr"], c["tpr"]) for c in drawn], axis=0)
    return grid, mean_tpr, float(np.mean([c["auc"] for c in drawn]))


def _roc_axes(ax, title: str, legend_title: str) -> None:
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1.0, label="chance")
    ax.set_xlim(-0.01, 1.01)  # a perfect curve runs along the axes: a margin keeps it in sight
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(color="0.9", linewidth=0.8)
    ax.set_xlabel("false positive rate", fontsize=11)
    ax.set_ylabel("true positive rate", fontsize=11)
    ax.set_title(title, fontsize=11, wrap=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0, fontsize=9, frameon=False,
              title=legend_title, title_fontsize=9, alignment="left")


def _colours(n: int):
    return plt.get_cmap("tab10" if n <= 10 else "tab20").colors


@plt.rc_context(TEXT_RC)
def plot_roc(y_true, proba, classes, title: str, out: Path) -> list[Path]:
    """One-vs-rest ROC curve per class and their macro average (``macro_curve``); a class without positives or
    without negatives has no curve and the legend says so."""
    fig, ax = plt.subplots(figsize=(5.2, 5.2))
    colours = _colours(len(classes))
    curves = class_curves(y_true, proba, classes)
    for i, c in enumerate(curves):
        if "missing" in c:
            ax.plot([], [], " ", label=f"{c['name']}: no {c['missing']}, no curve")
            continue
        ax.plot(c["fpr"], c["tpr"], color=colours[i % len(colours)], linewidth=1.4, clip_on=False,
                label=f"{c['name']} (n={c['n']}) AUC {c['auc']:.3f}")
    macro = macro_curve(curves)
    if macro is not None:
        grid, mean_tpr, mean_auc = macro
        ax.plot(grid, mean_tpr, color="black", linestyle="--", linewidth=2.4, clip_on=False,
                label=f"macro average ({sum('auc' in c for c in curves)} classes) AUC {mean_auc:.3f}")
    _roc_axes(ax, title, "one vs rest")
    return save_figure(fig, out)


@plt.rc_context(TEXT_RC)
def plot_macro_rocs(variants: dict[str, tuple], title: str, out: Path) -> list[Path]:
    """Several models' macro-average ROC curves on one plot (a study's variants on the same cells):
    ``variants`` maps a name to ``(y_true, proba, classes)``."""
    fig, ax = plt.subplots(figsize=(5.2, 5.2))
    colours = _colours(len(variants))
    for i, (name, (y_true, proba, classes)) in enumerate(variants.items()):
        macro = macro_curve(class_curves(y_true, proba, classes))
        if macro is None:
            ax.plot([], [], " ", label=f"{name}: no curve")
            continue
        grid, mean_tpr, mean_auc = macro
        ax.plot(grid, mean_tpr, color=colours[i % len(colours)], linewidth=1.6, clip_on=False,
                label=f"{name} AUC {mean_auc:.3f}")
    _roc_axes(ax, title, "macro average, one vs rest")
    return save_figure(fig, out)
