"""The plots a person reads: what the confusion matrix, the ROC plot and the preview grid say, read back from
the written SVG and from the figure itself, not only that a file exists."""

import re
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from aml_rapids.evaluate import plots
from aml_rapids.evaluate.plots import plot_confusion, plot_roc

ODD = "B $x$ [red]"  # TeX and markup look-alikes in a class name must stay literal text


def svg_texts(path) -> list[str]:
    """Every text element of an SVG, in document order (the plots keep text as text: svg.fonttype none)."""
    return [el.text for el in ET.parse(path).iter() if el.tag.endswith("}text") and el.text]


@pytest.fixture
def captured(monkeypatch):
    """The figures the plot functions save, kept open for the test to inspect."""
    figures, save = [], plots.save_figure

    def keep(fig, out):
        fig.canvas.draw()  # layout as saved: legend and text extents are final
        fig.renderer = fig.canvas.get_renderer()  # closing the figure takes its canvas
        figures.append(fig)
        return save(fig, out)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def check_files(paths, out):
    """``[png, svg]`` beside each other, both written; the PNG a real image of a readable size."""
    png, svg = paths
    assert png == out and svg == out.with_suffix(".svg")
    assert png.stat().st_size > 0 and svg.stat().st_size > 0
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 300
    ET.parse(svg)  # well-formed XML


# A known confusion matrix: A 8 cells (7 right, 1 called B), B 5 cells (all right), C none (n=0).
CLASSES = ["A", ODD, "C"]
Y_TRUE = ["A"] * 8 + [ODD] * 5
Y_PRED = ["A"] * 7 + [ODD] + [ODD] * 5


def test_confusion_writes_png_and_svg_with_count_and_row_share(tmp_path, captured):
    out = tmp_path / "confusion.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the n=0 row must not divide by zero
        paths = plot_confusion(Y_TRUE, Y_PRED, CLASSES, "cells: test", out)
    check_files(paths, out)
    texts = svg_texts(paths[1])
    # cell text is "count\nshare": the two lines are consecutive text elements
    pairs = list(zip(texts, texts[1:]))
    assert ("7", "87.5%") in pairs and ("1", "12.5%") in pairs and ("5", "100.0%") in pairs
    assert texts.count("–") == 3  # the C row: no true cells, no share
    assert {"A (n=8)", f"{ODD} (n=5)", "C (n=0)", ODD} <= set(texts)
    assert {"predicted class", "true class (n)", "share of the true class", "cells: test"} <= set(texts)

    (fig,) = captured
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    np.testing.assert_allclose(shown[:2].filled(np.nan), [[7 / 8, 1 / 8, 0], [0, 1, 0]])
    assert shown.mask[2].all()  # the n=0 row is no colour at all (grey), not 0%
    colour = {t.get_text(): t.get_color() for t in ax.texts}
    assert colour["7\n87.5%"] == "white" and colour["1\n12.5%"] == "black"  # light text on dark cells only


def test_confusion_is_coloured_by_share_not_count(tmp_path, captured):
    """A small class that is always right is as dark as it gets, however few its cells."""
    y_true = ["big"] * 100 + ["small"] * 4
    y_pred = ["big"] * 50 + ["small"] * 50 + ["small"] * 4
    plot_confusion(y_true, y_pred, ["big", "small"], "t", tmp_path / "c.png")
    shown = captured[0].axes[0].images[0]
    assert shown.get_array()[1, 1] == 1.0 and shown.get_array()[0, 0] == 0.5
    assert shown.norm.vmin == 0.0 and shown.norm.vmax == 1.0


def test_confusion_names_are_literal_text(tmp_path):
    paths = plot_confusion(Y_TRUE, Y_PRED, CLASSES, "title $x$ [red]", tmp_path / "c.png")
    svg = paths[1].read_text()
    assert ODD in svg and "title $x$ [red]" in svg


def roc_data():
    """Three classes with overlapping scores, and D with no cells at all."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.array(["A", ODD, "C"]), [20, 12, 8])
    classes = ["A", ODD, "C", "D"]
    proba = rng.dirichlet(np.ones(4), len(y))
    for i, name in enumerate(classes[:3]):
        proba[y == name, i] += 0.35
    return y, proba / proba.sum(axis=1, keepdims=True), classes


def test_roc_legend_names_classes_auc_and_macro(tmp_path, captured):
    y, proba, classes = roc_data()
    out = tmp_path / "roc.png"
    paths = plot_roc(y, proba, classes, "cells: test", out)
    check_files(paths, out)
    texts = svg_texts(paths[1])
    aucs = [roc_auc_score(y == name, proba[:, i]) for i, name in enumerate(classes[:3])]
    for name, n, auc in zip(classes, [20, 12, 8], aucs):
        assert f"{name} (n={n}) AUC {auc:.3f}" in texts
    assert f"macro average (3 classes) AUC {np.mean(aucs):.3f}" in texts
    assert "D: no positives, no curve" in texts
    assert {"false positive rate", "true positive rate", "chance"} <= set(texts)
    assert "Positive label" not in paths[1].read_text()

    (fig,) = captured
    ax = fig.axes[0]
    assert ax.get_xlim() == (-0.01, 1.01) and ax.get_ylim() == (-0.01, 1.01) and ax.get_aspect() == 1.0
    macro = next(line for line in ax.get_lines() if line.get_label().startswith("macro"))
    assert macro.get_linestyle() == "--" and macro.get_color() == "black"
    assert macro.get_linewidth() > max(line.get_linewidth() for line in ax.get_lines() if line is not macro)
    fpr, tpr = macro.get_data()
    assert fpr[0] == 0.0 and fpr[-1] == 1.0 and tpr[-1] == 1.0 and np.all(np.diff(tpr) >= 0)
    assert len([line for line in ax.get_lines() if len(line.get_xdata())]) == 5  # 3 classes, macro, chance
    legend, axes = ax.get_legend().get_window_extent(fig.renderer), ax.get_window_extent(fig.renderer)
    assert legend.x0 >= axes.x1 or legend.y1 <= axes.y0  # outside the curves: right of or below the axes


def test_roc_without_positives_or_negatives(tmp_path, captured):
    """Every cell of class A: A has no negatives, B no positives; no curve, no macro average, no crash."""
    paths = plot_roc(["A"] * 6, np.full((6, 2), 0.5), ["A", "B"], "t", tmp_path / "r.png")
    texts = svg_texts(paths[1])
    assert "A: no negatives, no curve" in texts and "B: no positives, no curve" in texts
    assert not any(t.startswith("macro") for t in texts)


def test_save_writes_both_and_closes(tmp_path):
    import matplotlib.pyplot as plt

    fig = plt.figure()
    paths = plots.save_figure(fig, tmp_path / "sub" / "x.png")
    assert paths == [tmp_path / "sub" / "x.png", tmp_path / "sub" / "x.svg"]
    assert all(p.stat().st_size > 0 for p in paths) and not plt.fignum_exists(fig.number)


def test_shorten_keeps_start_and_end():
    from aml_rapids.loader.preview import _shorten

    assert _shorten("cell_0002.tif") == "cell_0002.tif"
    short = _shorten("very_long_file_name_of_a_scanned_cell_0002.tif")
    assert len(short) == 24 and short.startswith("very_long") and short.endswith("0002.tif") and "…" in short


def test_preview_rows_name_class_file_and_foreground(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from aml_rapids.config import load_config
    from aml_rapids.data.manifest import build_manifest
    from aml_rapids.data.synthetic import write_demo_dataset
    from aml_rapids.loader.preview import _shorten, foreground_fractions, render_preview

    write_demo_dataset(tmp_path / "demo", patients_per_class=1, cells_per_patient=1)
    cfg = load_config(None, [])
    manifest = build_manifest(tmp_path / "demo", cfg.index).manifest
    table, root = manifest.table, manifest.root
    expected = foreground_fractions(table, root, cfg, per_class=1)["mean"]
    changed = root / table.loc[0, "path"]  # this file changed since indexing: no views, a placeholder
    changed.write_bytes(changed.read_bytes() + b"\0")
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or close(fig))
    out = render_preview(table, root, cfg, tmp_path / "p" / "preview.png", per_class=1)
    assert out == tmp_path / "p" / "preview.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not out.with_suffix(".svg").exists()
    (fig,) = figures
    rows = np.array(fig.axes).reshape(len(table), 4)
    labels = [row[0].get_ylabel().split("\n") for row in rows]
    for row, (label, patient, name, share), (_, cell) in zip(rows, labels, table.iterrows()):
        assert (label, patient, name) == tuple(map(_shorten, (cell["label"], cell["patient"], cell["path"].split("/")[-1])))
        if cell["path"] == table.loc[0, "path"]:
            assert share == "fg –" and "changed since" in row[1].texts[0].get_text()
        else:
            assert share == f"fg {expected[label]:.0%}" and re.fullmatch(r"fg \d+%", share)
    assert [ax.get_title() for ax in rows[0]] == ["original", "HSV mask", "segmented + resized", "augmented"]
    assert all(ax.get_title() == "" for ax in rows[1:].ravel())  # column titles once, at the top
    assert "hue" in fig._suptitle.get_text() and fig.get_size_inches()[1] / len(table) < 1.8
