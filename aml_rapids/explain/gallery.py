"""Galleries of cells from a prediction table (an evaluation's or a prediction's predictions.csv): per class the
most confident correct and the most confident wrong cells; per patient the cells that push its mean score for
the class it is called most (wrongly called patients first), or a patient-level model's most attended cells. Every tile names its cell, true and predicted class
and probability; gallery.csv lists every tile shown."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..config import GalleryConfig, RunConfig
from ..data.manifest import read_manifest
from ..errors import DataError
from ..evaluate.report import weights_words
from ..outputs import atomic_write_text, prepare_fresh_dir, read_json
from ..provenance import write_run_record
from ..logs import say
from .plots import plot_gallery

OUTPUTS = ("classes.png", "classes.svg", "patients.png", "patients.svg", "gallery.csv")


def read_predictions(path: Path) -> tuple[pd.DataFrame, list[str], dict]:
    """predictions.csv (or the folder holding it), its classes (the p_<class> columns) and the folder's
    metrics.json (empty for a prediction, which has none)."""
    path = Path(path)
    csv = path / "predictions.csv" if path.is_dir() else path
    if not csv.is_file():
        raise DataError(f"{csv} does not exist (give an evaluation or prediction folder, or its predictions.csv)")
    try:
        table = pd.read_csv(csv, dtype={"cell_id": str, "patient": str, "label": str, "predicted": str},
                            keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{csv} is not a readable CSV table ({type(exc).__name__}: {exc})") from None
    classes = [c.removeprefix("p_") for c in table.columns if c.startswith("p_")]
    missing = [c for c in ("cell_id", "label", "predicted") if c not in table]
    if missing or not classes:
        raise DataError(f"{csv} is not a prediction table (it lacks {', '.join(missing) or 'p_<class> columns'})")
    if table.empty:
        raise DataError(f"{csv} lists no cells")
    unknown = sorted(set(table["predicted"]) - set(classes))
    if unknown:
        raise DataError(f"{csv}: predicted class {unknown[0]!r} has no p_{unknown[0]} column: not a prediction "
                        "table of aml-rapids (evaluate's or predict's predictions.csv)")
    probabilities = table[[f"p_{c}" for c in classes]].apply(pd.to_numeric, errors="coerce")
    if probabilities.isna().any().any() or not probabilities.stack().between(0, 1).all():
        raise DataError(f"{csv}: its p_<class> columns hold values that are not probabilities")
    table[probabilities.columns] = probabilities
    if "patient" not in table:
        table["patient"] = ""
    metrics = csv.parent / "metrics.json"
    return table, classes, read_json(metrics) if metrics.is_file() else {}


def _tile(row: pd.Series, root: Path) -> dict:
    path = root / row["path_in_manifest"]
    try:
        image = np.asarray(Image.open(path).convert("RGB"))
    except OSError as exc:
        raise DataError(f"cannot read cell image {path}: {exc}") from None
    score = f"attention {row['p']:.3f}" if row["p_of"] == "attention" else f"p({row['p_of']}) {row['p']:.2f}"
    return {"image": image, "title": f"{row['cell_id'][:8]}\ntrue {row['label']}\npred {row['predicted']}\n{score}"}


def _shown(cells: pd.DataFrame, of: pd.Series | str) -> pd.DataFrame:
    """``cells`` with the class whose probability a tile shows (``p_of``) and that probability (``p``)."""
    cells = cells.assign(p_of=of)
    columns = cells.columns.get_indexer("p_" + cells["p_of"].astype(str))
    return cells.assign(p=cells.to_numpy()[np.arange(len(cells)), columns].astype(float))


def _top(cells: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` cells of highest ``p``, one per content: a dataset may hold one image under two names."""
    ranked = cells.sort_values("p", ascending=False)
    return (ranked.drop_duplicates("sha256") if "sha256" in ranked else ranked).head(n)


def class_rows(table: pd.DataFrame, classes: list[str], per_class: int) -> list[tuple[str, pd.DataFrame]]:
    """(row label, cells) per class: its most confident correct cells, then its most confident wrong ones (by
    the probability of the class they were wrongly given)."""
    rows = []
    for c in classes:
        mine = table[table["label"] == c]
        right = _shown(mine[mine["predicted"] == c], c)
        wrong = mine[mine["predicted"] != c]
        wrong = _shown(wrong, wrong["predicted"])
        rows.append((f"{c}\ncorrect", _top(right, per_class)))
        rows.append((f"{c}\nwrong", _top(wrong, per_class)))
    return rows


def patient_rows(table: pd.DataFrame, classes: list[str], settings: GalleryConfig) -> list[tuple[str, pd.DataFrame]]:
    """Per patient (wrongly called first, then the most cells): its cells with the highest probability of the
    class its mean calls, or, in a patient-level model's table (an ``attention`` column), its most attended
    cells."""
    with_patient = table[table["patient"] != ""]
    if with_patient.empty or not settings.patients:
        return []
    keyed = with_patient.assign(key=with_patient.get("cohort", "") + "/" + with_patient["patient"])
    means = keyed.groupby("key")[[f"p_{c}" for c in classes]].mean()
    called = pd.Series(np.array(classes)[means.to_numpy().argmax(axis=1)], index=means.index)
    truth = keyed.groupby("key")["label"].agg(lambda s: s.mode().iloc[0])
    size = keyed.groupby("key").size()
    order = sorted(means.index, key=lambda k: (called[k] == truth[k], -size[k], k))[:settings.patients]
    attended = "attention" in keyed
    rows = []
    for key in order:
        cells = keyed[keyed["key"] == key]
        label = (f"{cells['patient'].iloc[0]}\ntrue {truth[key]}\ncalled {called[key]}\n"
                 f"{'p' if attended else 'mean p'} {means.loc[key, f'p_{called[key]}']:.2f}, {size[key]} cells")
        shown = cells.assign(p_of="attention", p=cells["attention"]) if attended else _shown(cells, called[key])
        rows.append((label, _top(shown, settings.per_patient)))
    return rows


@dataclass
class Gallery:
    folder: Path
    tiles: int
    files: list[str]


def gallery(predictions: Path, manifest_path: Path, out: Path, cfg: RunConfig, overwrite: bool = False) -> Gallery:
    """classes.png (and patients.png where cells have patients) from a prediction table; images are read
    through the manifest the cells were indexed in."""
    settings = cfg.explain.gallery
    table, classes, metrics = read_predictions(predictions)
    if not Path(manifest_path).is_file():
        raise DataError(f"manifest {manifest_path} is not a file: give the manifest.parquet the cells were indexed in")
    manifest = read_manifest(manifest_path)
    cells = manifest.table.set_index("cell_id")
    missing = sorted(set(table["cell_id"]) - set(cells.index))
    if missing:
        raise DataError(f"{len(missing):,} cells of {predictions} are not in manifest {manifest_path} (e.g. "
                        f"{missing[0]}): give the manifest the predicted cells were indexed in")
    indexed = cells.loc[table["cell_id"]]
    table = table.assign(path_in_manifest=indexed["path"].to_numpy(), sha256=indexed["sha256"].to_numpy())
    prepare_fresh_dir(out, "gallery folder", OUTPUTS, overwrite)
    protocol = metrics.get("split_protocol", "a prediction (no split)")
    weights = "; ".join(f"{name}: {weights_words(b)}" for name, b in metrics.get("backbones", {}).items())
    about = f"{predictions}: {metrics.get('split', 'predicted')} cells ({protocol})" + (
        f"; weights: {weights}" if weights else "")
    shown, files = [], []
    attended = "attention" in table  # a patient-level model's: its p_<class> are the patients', not the cells'
    for name, rows, what in (("classes", [] if attended else class_rows(table, classes, settings.per_class),
                              "most confident correct and wrong cells per class"),
                             ("patients", patient_rows(table, classes, settings),
                              "each patient's most attended cells (attention MIL)" if attended else
                              "each patient's cells with the highest probability of the class it is called")):
        if not rows:
            continue
        tiles = []
        for label, cells in rows:
            tiles.append((label, [_tile(r, manifest.root) for _, r in cells.iterrows()]))
            shown.append(cells.assign(group=label.replace("\n", " "))[["group", "cell_id", "path_in_manifest", "label",
                                                                        "predicted", "p_of", "p"]])
        files += [path.name for path in plot_gallery(tiles, f"{what}\n{about}", out / f"{name}.png")]
    listing = pd.concat(shown).rename(columns={"path_in_manifest": "path"})
    atomic_write_text(out / "gallery.csv", listing.to_csv(index=False))
    write_run_record(out, "gallery", cfg, predictions=str(predictions), manifest=str(manifest_path), files=files)
    say(f"gallery: {', '.join(str(out / f) for f in files)} ({len(listing)} tiles)")
    return Gallery(out, len(listing), files)
