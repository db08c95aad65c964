"""PNG plots a person looks at: the confusion matrix and one-vs-rest ROC curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402


@plt.rc_context({"text.parse_math": False})  # class names and paths are text, not TeX
def confusion_png(y_true, y_pred, classes, title: str, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 3, 1.2 * len(classes) + 2))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=classes, ax=ax, xticks_rotation=45,
                                            colorbar=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@plt.rc_context({"text.parse_math": False})  # class names and paths are text, not TeX
def roc_png(y_true, proba, classes, title: str, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, name in enumerate(classes):
        positives = np.asarray(y_true) == name
        if positives.any() and not positives.all():
            RocCurveDisplay.from_predictions(positives, proba[:, i], name=str(name), ax=ax)
    ax.plot([0, 1], [0, 1], ls=":", c="gray")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
