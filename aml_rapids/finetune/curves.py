"""The training curves a person reads to judge a fine-tuning: loss and accuracy against steps, training (each
step, and a running mean) beside validation (every ``val_every`` steps), the best step marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from ..evaluate.plots import TEXT_RC, save_figure


@plt.rc_context(TEXT_RC)
def plot_curves(steps: pd.DataFrame, best_step: int | None, title: str, out: Path) -> list[Path]:
    """``steps``: steps.csv's table (step, train_loss, train_accuracy, val_loss, val_accuracy)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, len(steps) // 50)
    val = steps.dropna(subset=["val_loss"])
    for ax, key, name in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        if window == 1:
            ax.plot(steps["step"], steps[f"train_{key}"], color="tab:blue", label="training (each step)")
        else:
            ax.plot(steps["step"], steps[f"train_{key}"], color="tab:blue", alpha=0.25, lw=0.8, label="training (step)")
            ax.plot(steps["step"], steps[f"train_{key}"].rolling(window, min_periods=1).mean(), color="tab:blue",
                    label=f"training (mean of {window} steps)")
        ax.plot(val["step"], val[f"val_{key}"], "o-", color="tab:orange", ms=3, label="validation")
        if best_step is not None:
            ax.axvline(best_step, color="grey", ls="--", lw=1, label=f"best validation loss (step {best_step})")
        ax.set_xlabel("step (mini-batch)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, out)
