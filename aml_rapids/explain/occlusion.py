"""Occlusion sensitivity of the hybrid classifier (captum's ``Occlusion``): the stacking model (z-score, PCA,
SVM, forest, meta-learner) has no gradient, so its map is the drop in its class probability as a square of the
cell is set to the segmentation's black background. Every occluded copy of a group of cells goes through all
backbones (extraction's own networks) and the classifier in one pass."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..classify.io import load_cell_model, seen_in_training
from ..config import RunConfig, load_config
from ..errors import ConfigError, DataError
from ..evaluate.report import weights_words
from ..features.engines import calibration_of
from ..features.extract import load_backbones, storable
from ..loader.loader import resolve_device
from ..logs import say
from ..outputs import prepare_fresh_dir, read_json
from ..progress import progress_bar
from ..provenance import write_run_record
from ..data.manifest import read_source
from .cells import choose_cells, normalise, read_cells
from .gradcam import Explained, cell_table, outcome, save_maps, target_indices
from .maps import pooled, rank_correlation
from .networks import seen_by

OUTPUTS = ("maps.npy", "cells.csv", "summary.json", "occlusion.png", "occlusion.svg")


class Hybrid:
    """Cells (RGB in [0, 1]) -> the stacking model's class probabilities, through every backbone it reads."""

    def __init__(self, model, info: dict, cfg: RunConfig, device: str, calibrate=None):
        self.model, self.names = model, list(info["backbones"])
        self.cfg, self.device = cfg, device
        self.backbones = load_backbones(cfg, device, calibrate)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.cfg.features.channels_last:  # as extraction feeds them: the networks' weights are laid out so
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        blocks = []
        with torch.no_grad():
            for name in self.names:
                norm = self.backbones.normalizations[self.backbones.norm_of[name]]
                features = self.backbones.nets[name](normalise(pixels, norm)).float().cpu().numpy()
                # rounded as the store holds them: the model was fitted on stored features
                blocks.append(storable(features, name, self.cfg.features.store_dtype).astype(np.float32))
        return torch.as_tensor(self.model.predict_proba(np.concatenate(blocks, axis=1)), dtype=torch.float32,
                               device=pixels.device)


def occlusion_maps(hybrid: Hybrid, images: torch.Tensor, targets: np.ndarray, window: int, stride: int,
                   rows_per_pass: int, advance=lambda n: None) -> np.ndarray:
    """(N, S, S): for each pixel, the mean drop of p(target) over the occluding windows that cover it."""
    from captum.attr import Occlusion

    size = images.shape[-1]
    windows = (-(-(size - window) // stride) + 1) ** 2  # captum's count: a last window flush with the edge
    group = max(1, rows_per_pass // windows)  # cells per attribute call; their occluded copies share passes
    occlusion = Occlusion(hybrid)
    maps = []
    for i in range(0, len(images), group):
        cells = images[i:i + group].to(hybrid.device)
        attributions = occlusion.attribute(cells, sliding_window_shapes=(3, window, window),
                                           strides=(3, stride, stride), baselines=0.0,
                                           target=[int(t) for t in targets[i:i + group]],
                                           perturbations_per_eval=max(1, min(windows, rows_per_pass // len(cells))))
        maps.append(attributions[:, 0].float().cpu().numpy())
        advance(len(cells))
    return np.concatenate(maps)


def _cells_of(gradcam_dir: Path, manifest, classes: list[str], size: int) -> tuple[pd.DataFrame, np.ndarray,
                                                                                 np.ndarray]:
    """The cells of a Grad-CAM run (same order), its target classes as the hybrid's indices, and its maps."""
    try:
        made_by = read_json(gradcam_dir / "summary.json")
        table = pd.read_csv(gradcam_dir / "cells.csv", dtype={"cell_id": str, "target": str}, keep_default_na=False)
        maps = np.load(gradcam_dir / "maps.npy").astype(np.float32)
    except (OSError, ValueError, pd.errors.ParserError, DataError) as exc:
        raise DataError(f"{gradcam_dir} is not a readable Grad-CAM folder (summary.json, cells.csv, maps.npy): "
                        f"{exc}") from None
    if not isinstance(made_by, dict) or "layer" not in made_by:
        raise DataError(f"{gradcam_dir} is not a folder `aml-rapids gradcam` wrote (its summary.json names no layer)")
    missing_columns = {"cell_id", "target"} - set(table.columns)
    if missing_columns or maps.ndim != 3 or len(maps) != len(table) or maps.shape[1:] != (size, size):
        raise DataError(f"{gradcam_dir}: its maps.npy ({'x'.join(map(str, maps.shape))}) does not hold one {size}x"
                        f"{size} map for each row of its cells.csv ({len(table)} rows"
                        + (f", lacking {', '.join(sorted(missing_columns))}" if missing_columns else "")
                        + f"); the model reads {size}x{size} images: give a Grad-CAM run of this model's cells")
    rows = manifest.table.set_index("cell_id")
    missing = sorted(set(table["cell_id"]) - set(rows.index))
    if missing:
        raise DataError(f"{len(missing)} cells of {gradcam_dir / 'cells.csv'} are not in the source (e.g. "
                        f"{missing[0]}): give the source that Grad-CAM run read")
    unknown = sorted(set(table["target"].astype(str)) - set(classes))
    if unknown:
        raise ConfigError(f"the Grad-CAM run explains classes the model does not know ({', '.join(unknown[:5])}; it "
                          f"has {', '.join(classes)})")
    index = {c: i for i, c in enumerate(classes)}
    return rows.loc[table["cell_id"]].reset_index(), table["target"].map(index).to_numpy(), maps


def occlusion(model_dir: Path, source: Path, out: Path, cfg: RunConfig, against: Path | None = None,
              overwrite: bool = False) -> Explained:
    """Occlusion maps of the model's class probability on a seeded per-class sample of the source's split (or
    on the cells of a Grad-CAM run, ``against``, with its targets, and the rank correlation of the two maps)."""
    started = time.perf_counter()
    model, info = load_cell_model(model_dir, "occlusion")
    if not info.get("extract_config"):
        raise ConfigError(f"model {model_dir} does not record how its features were extracted, so its cells "
                          "cannot be run through its networks again")
    extract_cfg = load_config(None, ["features.compile=false"], base=info["extract_config"])
    settings, gradcam_settings = cfg.explain.occlusion, cfg.explain.gradcam
    if settings.window > extract_cfg.loader.image_size:
        raise ConfigError(f"explain.occlusion.window {settings.window} is larger than the {extract_cfg.loader.image_size}"
                          f" px images model {model_dir} reads")
    classes = [str(c) for c in model.classes_]
    manifest = read_source(source, extract_cfg.index)
    if against is not None:
        table, targets, gradcam = _cells_of(Path(against), manifest, classes, extract_cfg.loader.image_size)
        say(f"occluding the {len(table)} cells of {against} for its target classes (explain.gradcam's split, "
            "cells_per_class and target do not apply)")
    else:
        table = choose_cells(manifest, gradcam_settings.split, gradcam_settings.cells_per_class, gradcam_settings.seed)
    prepare_fresh_dir(out, "occlusion folder", OUTPUTS, overwrite)
    cells = read_cells(table, manifest, extract_cfg)
    device = "cuda" if resolve_device(cfg.loader.device) == "gpu" else "cpu"
    hybrid = Hybrid(model, info, extract_cfg, device, lambda norms: calibration_of(
        cells.table.head(extract_cfg.features.calibration_cells), manifest, extract_cfg, norms))
    proba = np.concatenate([hybrid(cells.images[i:i + gradcam_settings.batch_size].to(device)).cpu().numpy()
                            for i in range(0, len(cells.images), gradcam_settings.batch_size)])
    if against is None:
        targets = target_indices(classes, cells.table["label"], proba, gradcam_settings.target)
    else:
        kept = table["cell_id"].isin(cells.table["cell_id"]).to_numpy()
        targets, gradcam = targets[kept], gradcam[kept]
    say(f"occlusion of the hybrid ({', '.join(hybrid.names)}): {len(cells.images)} cells, window "
        f"{settings.window}, stride {settings.stride}")
    with progress_bar("occluding", total=len(cells.images), unit="cells") as (advance, _):
        maps = occlusion_maps(hybrid, cells.images, targets, settings.window, settings.stride, settings.rows_per_pass,
                              advance)
    seen = seen_in_training(cells.table, model_dir, info) | seen_by(hybrid.backbones.seen)(cells.table)
    result = cell_table(cells, proba, targets, classes, seen)
    columns = ["max_drop"]
    result["max_drop"] = maps.reshape(len(maps), -1).max(axis=1)
    if against is not None:
        result["rho_gradcam"] = rank_correlation(pooled(maps, settings.stride), pooled(gradcam, settings.stride))
        columns.append("rho_gradcam")
    weights = "; ".join(f"{name}: {weights_words(b)} ({b['weights']})" for name, b in info["backbones"].items())
    summary = {"model": str(model_dir), "backbones": list(info["backbones"]), "weights": weights,
               "split_protocol": cells.protocol, "model_split_protocol": info.get("split_protocol"),
               "target": "as the Grad-CAM run" if against else gradcam_settings.target,
               "against": str(against) if against else None, "window": settings.window, "stride": settings.stride,
               **outcome(cells, result, columns, device, started)}
    save_maps(out, "occlusion", cells, maps, result, summary, classes, gradcam_settings.show_per_class,
              title=(f"occlusion of the hybrid ({', '.join(hybrid.names)}; {settings.window}px black square, stride "
                     f"{settings.stride}), target class: {summary['target']}\nweights: {weights}; "
                     + (f"cells of split {gradcam_settings.split}" if against is None else f"the cells of {against}")
                     + f" ({cells.protocol}); white line: HSV mask"),
              colour_label="drop in p(class) when occluded", signed=True)
    write_run_record(out, "occlusion", cfg, model=str(model_dir), source=str(source), summary=summary)
    whole = summary["all"]
    say(f"model accuracy on these cells {whole['accuracy']}"
        + (f"; rank correlation with the Grad-CAM maps {whole['rho_gradcam']}" if against is not None else ""))
    return Explained(out, len(result), summary)

