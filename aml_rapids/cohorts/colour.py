"""The colour of a cohort's segmented cells: per cell, the mean hue, saturation and value of the pixels the
project's HSV mask keeps, and their mean optical density of each stain (haematoxylin, eosin, DAB: scikit-image's
``rgb2hed`` colour deconvolution); per cohort, the mean and the spread of these over its cells. Another
hospital's stain, scanner or staining time shows here in terms a person can check, where the domain classifier
only says that two cohorts differ.

The images are decoded and masked by the loader's own DALI graph (on the CPU), so the foreground is the one the
networks were given; the colours are those of the files, before any stain normalisation. Hue is an angle: its means are circular, its differences taken the shorter way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import circmean, circstd
from skimage.color import rgb2hed, rgb2hsv

from ..classify.data import select_rows
from ..config import LoaderConfig, RunConfig, SegmentationConfig
from ..features.store import FeatureStore
from ..loader.loader import CellLoader

STATISTICS = ("hue_deg", "saturation", "value", "haematoxylin_od", "eosin_od", "dab_od")


@dataclass
class CohortColour:
    chosen: int  # cells drawn (seeded)
    measured: int  # ... whose statistics were taken
    missing: int  # ... whose file is gone
    unreadable: int  # ... whose file the loader could not use (changed since indexing)
    no_foreground: int  # ... of which the HSV mask keeps no pixel
    mean: dict[str, float]  # per statistic, its mean over the measured cells (hue: circular)
    std: dict[str, float]  # ... and its spread between them


@dataclass
class ColourDrift:
    reference: CohortColour
    new: CohortColour
    difference: dict[str, float]  # new minus reference, of each mean (hue: the shorter way round, in degrees)

    def notes(self) -> list[str]:
        """What the statistics do not rest on: cells drawn but not measured, and why."""
        return [f"colour statistics of the {side} cohort rest on {c.measured} of the {c.chosen} cells drawn: "
                f"{c.missing} files missing, {c.unreadable} unreadable, {c.no_foreground} without foreground"
                for side, c in (("reference", self.reference), ("new", self.new)) if c.measured < c.chosen]


def cell_colour(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """One cell's ``STATISTICS`` over its foreground (``rgb`` HxWx3 uint8, ``mask`` HxW bool); None without one."""
    pixels = rgb[mask].astype(np.float64) / 255.0
    if not len(pixels):
        return None
    hsv = rgb2hsv(pixels)
    hue = circmean(hsv[:, 0], high=1.0, low=0.0) * 360.0
    return np.array([hue, *hsv[:, 1:].mean(axis=0), *rgb2hed(pixels).mean(axis=0)])


def summarise(cells: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """The mean and spread over cells (rows of ``STATISTICS``), hue's circular."""
    if not len(cells):
        return {}, {}
    hue = cells[:, 0]
    means = [circmean(hue, high=360.0, low=0.0), *cells[:, 1:].mean(axis=0)]
    spreads = [circstd(hue, high=360.0, low=0.0), *cells[:, 1:].std(axis=0)]
    return dict(zip(STATISTICS, map(float, means))), dict(zip(STATISTICS, map(float, spreads)))


def measure_files(files: list[Path], segmentation: SegmentationConfig) -> CohortColour:
    """The colour of these image files' foregrounds; missing and unreadable files are counted, not measured."""
    present = [Path(f).absolute() for f in files if Path(f).is_file()]
    values, no_foreground, unreadable = [], 0, 0
    if present:
        table = pd.DataFrame({"path": [str(f) for f in present], "bytes": [f.stat().st_size for f in present]})
        # one cell a batch: decoded images of different sizes do not stack; the networks' input is not used
        cfg = RunConfig(segmentation=segmentation, loader=LoaderConfig(device="cpu", batch_size=1, image_size=8))
        loader = CellLoader(table, Path("/"), cfg, debug=True)  # the paths are absolute
        for batch in loader:
            cell = cell_colour(batch.views["decoded"][0].numpy(), batch.views["mask"][0, ..., 0].numpy())
            if cell is None:
                no_foreground += 1
            else:
                values.append(cell)
        unreadable = len(loader.failures)
    mean, std = summarise(np.array(values).reshape(-1, len(STATISTICS)))
    return CohortColour(len(files), len(values), len(files) - len(present), unreadable, no_foreground, mean, std)


def _record_root(record: dict) -> Path | None:
    """The folder a manifest's paths are relative to: its record's root; a record made before records named it,
    the manifest's source folder (a CSV's folder)."""
    if record.get("root"):
        return Path(record["root"])
    if not record.get("source"):
        return None
    source = Path(record["source"])
    return source.parent if source.suffix.lower() == ".csv" else source


def image_files(store: FeatureStore, cells: int, seed: int, among: np.ndarray | None = None) -> list[Path]:
    """The image files of a seeded sample of at most ``cells`` of the store's usable original cells (of those
    ``among`` marks, if given), each under the root of the manifest that named its cohort (cohorts no record
    names: the latest manifest's root)."""
    _, rows = select_rows(store, None, originals_only=True)
    rows = rows if among is None else rows[among]
    rows = rows.sample(min(cells, len(rows)), random_state=seed)
    roots, latest = {}, None
    for record in store.meta.get("manifests") or []:
        latest = _record_root(record)
        roots.update(dict.fromkeys(record.get("cohorts", ()), latest))
    where = [roots.get(cohort, latest) for cohort in rows["cohort"]]
    return [root / path if root is not None else Path(path) for root, path in zip(where, rows["path"])]


def store_colour(store: FeatureStore, cells: int, seed: int, among: np.ndarray | None = None) -> CohortColour:
    """The colour of a seeded sample of the store's cells (of those ``among`` marks, if given), masked with the
    segmentation its features were made with."""
    segmentation = SegmentationConfig(**store.meta["preprocess"]["segmentation"])
    return measure_files(image_files(store, cells, seed, among), segmentation)


def compare_colour(reference: CohortColour, new: CohortColour) -> ColourDrift:
    difference = {name: new.mean[name] - reference.mean[name] for name in STATISTICS
                  if name in new.mean and name in reference.mean}
    if "hue_deg" in difference:
        difference["hue_deg"] = (difference["hue_deg"] + 180.0) % 360.0 - 180.0
    return ColourDrift(reference, new, difference)
