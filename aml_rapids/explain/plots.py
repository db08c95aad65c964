"""Pictures of explanations: a grid of cells with their maps, 2-D embeddings coloured four ways, galleries of
cell tiles. Every title carries the split protocol and the weights; PNG and SVG (``save_figure``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..evaluate.plots import TEXT_RC, save_figure  # noqa: E402

TILE_INCH = 1.7
HEADER_INCH = 0.5  # the two-line title above a grid
TITLE_INCH = 0.6  # a tile's own title, up to four lines
BAR_INCH = 0.9  # the colour bar and its label, right of a map grid


def _grid(rows: int, cols: int, label_inch: float, right_inch: float):
    """A figure of ``rows`` x ``cols`` square tiles laid out in inches (tight_layout centres square images in
    taller slots and leaves gaps): the row labels left, ``right_inch`` free on the right, the title above."""
    width = label_inch + cols * TILE_INCH + right_inch
    height = HEADER_INCH + rows * (TILE_INCH + TITLE_INCH) + 0.1
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=label_inch / width, right=(label_inch + cols * TILE_INCH) / width,
                        top=1 - (HEADER_INCH + TITLE_INCH) / height, bottom=0.1 / height, wspace=0.06,
                        hspace=TITLE_INCH / TILE_INCH)
    return fig, axes, height


def _tile_title(row: pd.Series) -> str:
    mark = "" if row["predicted"] == row["label"] else " ✗"
    mapped = "" if row["target"] == row["predicted"] else f"\nmap of {row['target']} {row['p_target']:.2f}"
    return f"{row['cell_id'][:8]}\ntrue {row['label']}\npred {row['predicted']} {row['p_predicted']:.2f}{mark}{mapped}"


@plt.rc_context(TEXT_RC)
def plot_maps(cells, maps: np.ndarray, table: pd.DataFrame, classes: list[str], per_class: int, out: Path,
              title: str, colour_label: str, signed: bool) -> list[Path]:
    """A row per class (its first ``per_class`` cells): the segmented cell under its map, the HSV mask's outline
    in white. ``signed`` maps (occlusion) get a diverging scale centred on zero."""
    rows = [(label, group.index[:per_class]) for label, group in table.groupby("label", sort=True)]
    cols = max(len(index) for _, index in rows)
    fig, axes, height = _grid(len(rows), cols, 1.6, BAR_INCH)
    limit = (float(np.nanmax(np.abs(maps))) or 1.0) if signed else 1.0
    shown = None
    for r, (label, index) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(label), fontsize=10, rotation=0, ha="right", va="center", labelpad=8)
            if c >= len(index):
                ax.axis("off")
                continue
            i = index[c]
            ax.imshow(cells.images[i].permute(1, 2, 0).clamp(0, 1).numpy())
            shown = ax.imshow(maps[i], cmap="RdBu_r" if signed else "jet", alpha=0.45,
                              vmin=-limit if signed else 0.0, vmax=limit)
            ax.contour(cells.masks[i], levels=[0.5], colors="white", linewidths=0.6)
            ax.set_title(_tile_title(table.loc[i]), fontsize=7, pad=3)
    fig.suptitle(title, fontsize=8, y=1 - 0.05 / height, va="top")
    if shown is not None:
        right = axes[0][-1].get_position().x1
        bar = fig.colorbar(shown, cax=fig.add_axes((right + 0.02, 0.2, 0.015, 0.6)))
        bar.set_label(colour_label, fontsize=8)
    return save_figure(fig, out)


COLOURINGS = ("label", "patient", "cohort", "split")


@plt.rc_context(TEXT_RC)
def plot_embedding(coords: pd.DataFrame, title: str, out: Path) -> list[Path]:
    """Four panels of the same points, coloured by class, patient, cohort and split; a legend where a panel
    has at most 20 values."""
    fig, axes = plt.subplots(1, 4, figsize=(22, 7.5))
    size = float(np.clip(30_000 / max(len(coords), 1), 2, 30))
    for ax, column in zip(axes, COLOURINGS):
        values = coords[column].fillna("").astype(str)
        kinds = sorted(values.unique())
        palette = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
        for k, kind in enumerate(kinds):
            chosen = (values == kind).to_numpy()
            ax.scatter(coords["x"][chosen], coords["y"][chosen], s=size, alpha=0.6, color=palette(k % palette.N),
                       label=kind or "(none)", rasterized=True, linewidths=0)
        name = {"label": "class"}.get(column, column)
        ax.set_title(f"{name}: {len(kinds)} value{'s' if len(kinds) != 1 else ''}"
                     + ("" if len(kinds) <= 20 else " (colours repeat; no legend)"), fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        if len(kinds) <= 20:
            ax.legend(fontsize=7, markerscale=max(1.0, 12 / size), loc="upper left", bbox_to_anchor=(0, -0.01),
                      ncol=2, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return save_figure(fig, out)


@plt.rc_context(TEXT_RC)
def plot_gallery(rows: list[tuple[str, list[dict]]], title: str, out: Path) -> list[Path]:
    """Rows of tiles: ``(row label, [{"image": HxWx3, "title": str}, ...])``."""
    cols = max([len(tiles) for _, tiles in rows] + [1])
    fig, axes, height = _grid(len(rows), cols, 2.2, 0.1)
    for r, (label, tiles) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center", labelpad=8)
            if c >= len(tiles):
                if c == 0:
                    ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=9)
                else:
                    ax.axis("off")
                continue
            ax.imshow(tiles[c]["image"])
            ax.set_title(tiles[c]["title"], fontsize=7, pad=3)
    fig.suptitle(title, fontsize=9, y=1 - 0.05 / height, va="top")
    return save_figure(fig, out, dpi=100)  # photographs: 150 dpi made a class gallery 6 MB
