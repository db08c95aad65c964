"""A PNG grid of what the pipeline does to a few cells per class: original, mask, segmented, augmented."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..config import RunConfig  # noqa: E402
from .loader import CellLoader  # noqa: E402

VIEWS = ("decoded", "mask", "resized", "augmented")
TITLES = ("original", "HSV mask", "segmented + resized", "augmented")


def pick_examples(table: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """A seeded sample of ``per_class`` rows of every class."""
    shuffled = table.sample(frac=1.0, random_state=seed).groupby("label").head(per_class)
    return shuffled.sort_values(["label", "path"]).reset_index(drop=True)


def _debug_views(table: pd.DataFrame, root: Path, cfg: RunConfig, keys: tuple[str, ...]) -> dict[int, dict]:
    """Run the CPU graph with its debug outputs; views per table position (none for a file that changed since
    indexing). One cell a batch: the original views of cells of different sizes do not stack."""
    cpu_cfg = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"device": "cpu", "batch_size": 1})})
    views: dict[int, dict[str, np.ndarray]] = {}
    for batch in CellLoader(table, root, cpu_cfg, augment=True, debug=True):
        for i, pos in enumerate(batch.positions):
            views[int(pos)] = {k: batch.views[k][i].cpu().numpy() for k in keys}
    return views


def foreground_fractions(table: pd.DataFrame, root: Path, cfg: RunConfig, per_class: int = 200) -> pd.DataFrame:
    """Share of each cell image the HSV mask keeps, summarised per class over a seeded sample; ``count`` is
    the cells that could be read (0 for a class whose sampled files all changed since indexing)."""
    sample = pick_examples(table, per_class, cfg.loader.seed)
    views = _debug_views(sample, root, cfg, ("mask",))
    sample = sample.assign(foreground=[float(views[i]["mask"].mean()) if i in views else np.nan
                                       for i in range(len(sample))])
    stats = sample.groupby("label")["foreground"].describe(percentiles=[0.05, 0.5, 0.95])
    stats = stats.reindex(sorted(sample["label"].unique()))
    return stats.assign(count=stats["count"].fillna(0))[["count", "mean", "5%", "50%", "95%"]]


def _what_it_shows(cfg: RunConfig) -> str:
    """The preview's title: the mask's thresholds, and the colour steps that are on."""
    seg, norm, aug = cfg.segmentation, cfg.stain_norm, cfg.augment
    lines = [f"HSV mask: hue {seg.hue_min:g}-{seg.hue_max:g} deg, saturation >= {seg.saturation_min:g}"
             + ("" if seg.enabled else " (segmentation off)") + "; fg: share of the image the mask keeps"]
    if norm.method != "none":
        lines.append(f"stain normalisation {norm.method} ({norm.region}) to {Path(norm.reference).name}, in every column "
                     "after the mask")
    jitter = [name for name in ("colour", "stain") if getattr(aug, name).enabled]
    if jitter and aug.enabled:
        lines.append(f"{' and '.join(jitter)} jitter in the augmented column only")
    return "\n".join(lines)


def _shorten(text: str, width: int = 24) -> str:
    """``text`` cut in the middle to at most ``width`` characters, so its start and its end (a file's number and
    extension) both stay."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return f"{text[:head]}…{text[len(text) - (width - 1 - head):]}"


CELL_INCH = 1.6  # side of one image in the grid
LABEL_INCH = 1.9  # the row labels left of the grid
HEADER_INCH = 0.55  # a one-line suptitle and the column titles above it


@plt.rc_context({"text.parse_math": False})  # class names and paths are text, not TeX
def render_preview(table: pd.DataFrame, root: Path, cfg: RunConfig, out: Path, per_class: int = 3) -> Path:
    """Run the CPU graph with its debug outputs on a few cells per class and save the grid as a PNG: a row per
    cell (class, patient, file, the share of the image its HSV mask keeps), a column per stage."""
    examples = pick_examples(table, per_class, cfg.loader.seed)
    views = _debug_views(examples, root, cfg, VIEWS)
    rows, cols = len(examples), len(VIEWS)
    heading = _what_it_shows(cfg)
    header = HEADER_INCH + 0.16 * heading.count("\n")
    width, height = LABEL_INCH + cols * CELL_INCH, header + rows * CELL_INCH
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=LABEL_INCH / width, right=1.0, bottom=0.0, top=1.0 - header / height,
                        wspace=0.04, hspace=0.04)
    for row, (pos, cell) in enumerate(examples.iterrows()):
        share = f"fg {views[pos]['mask'].mean():.0%}" if pos in views else "fg –"
        for col, (key, title) in enumerate(zip(VIEWS, TITLES)):
            ax = axes[row][col]
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9, pad=4)
            if col == 0:
                patient = str(cell.get("patient") or "")  # two patients' files may share a name
                lines = [str(cell["label"]), *([patient] if patient else []), Path(cell["path"]).name]
                ax.set_ylabel("\n".join([*map(_shorten, lines), share]), fontsize=8, rotation=0, ha="right",
                              va="center", labelpad=6, linespacing=1.4)
            if pos not in views:
                ax.text(0.5, 0.5, "unreadable:\nchanged since\nindexing", ha="center", va="center", fontsize=7)
                continue
            image = views[pos][key]
            ax.imshow(image[..., 0] * 255 if key == "mask" else image, cmap="gray", vmin=0, vmax=255)
    fig.suptitle(heading, fontsize=9, x=(LABEL_INCH + cols * CELL_INCH / 2) / width,
                 y=1.0 - 0.12 / height, va="top")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight", pad_inches=0.08)
    plt.close(fig)
    return out
