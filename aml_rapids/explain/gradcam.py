"""Grad-CAM of one backbone on a sample of cells (pytorch-grad-cam), batched, in fp32 on the uncompiled network
(hooks miss compiled graphs, and half precision breaks the gradients CAM weighs by), with the pointing test per
class and, optionally, the model-randomisation test."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import RunConfig, load_config
from ..errors import ConfigError
from ..evaluate.report import weights_words
from ..features.backbones import BackboneSpec
from ..loader.loader import resolve_device
from ..logs import say, warn
from ..outputs import atomic_save_array, atomic_write_text, prepare_fresh_dir
from ..provenance import write_run_record
from ..data.manifest import read_source
from .cells import Cells, choose_cells, read_cells
from .maps import mean_or_none, pointing, rank_correlation
from .networks import ExplainedNetwork, from_checkpoint, from_probe, probe_source
from .plots import plot_maps

OUTPUTS = ("maps.npy", "cells.csv", "summary.json", "gradcam.png", "gradcam.svg")


def token_grid(tokens: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """A ViT layer's (N, prefix + side^2, C) tokens as an (N, C, side, side) map, the class (and register)
    tokens dropped."""
    patches = tokens[:, prefix:, :]
    side = round(patches.shape[1] ** 0.5)
    if side * side != patches.shape[1]:
        raise ConfigError(f"a token layer of {tokens.shape[1]} tokens is not {prefix} prefix tokens and a square "
                          "patch grid")
    return patches.reshape(len(tokens), side, side, -1).permute(0, 3, 1, 2)


def map_layout(spec: BackboneSpec) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """How the Grad-CAM layer's output becomes the (N, C, H, W) map pytorch-grad-cam weighs: a ViT's tokens
    reshaped to their grid, a Swin's (N, H, W, C) maps permuted; a CNN's maps as they are (None)."""
    if spec.tokens is not None:
        return partial(token_grid, prefix=spec.tokens)
    if spec.nhwc:
        return lambda maps: maps.permute(0, 3, 1, 2)
    return None


def class_scores(net: ExplainedNetwork, images: torch.Tensor, batch_size: int, device: str) -> np.ndarray:
    """Softmax probabilities of the network's head, (N, classes)."""
    model = net.model.to(device)
    with torch.no_grad():
        return np.concatenate([torch.softmax(model(images[i:i + batch_size].to(device)).float(), 1).cpu().numpy()
                               for i in range(0, len(images), batch_size)])


def gradcam_maps(net: ExplainedNetwork, images: torch.Tensor, targets: np.ndarray, batch_size: int,
                 device: str) -> np.ndarray:
    """(N, S, S) Grad-CAM maps for class indices ``targets``, each scaled to [0, 1] as pytorch-grad-cam does."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = net.model.to(device).float()
    maps = []
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on a GPU too
    with _restored(tf32), GradCAM(model=model, target_layers=[net.layer],
                 reshape_transform=map_layout(net.spec)) as cam:
        for i in range(0, len(images), batch_size):
            chosen = [ClassifierOutputTarget(int(t)) for t in targets[i:i + batch_size]]
            try:
                maps.append(cam(input_tensor=images[i:i + batch_size].to(device), targets=chosen))
            except (AttributeError, ValueError, RuntimeError, IndexError) as exc:  # a layer output CAM cannot weigh
                raise ConfigError(f"Grad-CAM cannot read {net.backbone}'s layer {net.spec.gradcam_layer}: its output is "
                                  f"not a feature map or a token grid it can weigh ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}); explain it with "
                                  "`aml-rapids occlusion`, which reads no layer") from None
    return np.concatenate(maps).astype(np.float32)


@contextmanager
def _restored(tf32: tuple[bool, bool]):
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def target_indices(classes: list[str], labels: pd.Series, proba: np.ndarray, target: str) -> np.ndarray:
    """The class each map explains: the predicted one, or the true one (which the model must know)."""
    if target == "predicted":
        return proba.argmax(axis=1)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ConfigError(f"target: true, but the model knows no class {', '.join(unknown[:5])} (it has "
                          f"{', '.join(classes)}); use target: predicted")
    return labels.map({c: i for i, c in enumerate(classes)}).to_numpy()


def cell_table(cells: Cells, proba: np.ndarray, targets: np.ndarray, classes: list[str],
               in_training: np.ndarray) -> pd.DataFrame:
    """One row per explained cell: who it is, what the model said, what it was asked to explain, and whether
    the model (or its network) trained on it."""
    names = np.array(classes)
    table = cells.table[[c for c in ("cell_id", "path", "cohort", "patient", "label", "split")
                         if c in cells.table]].copy()
    table["target"] = names[targets]
    table["predicted"] = names[proba.argmax(axis=1)]
    table["p_target"] = proba[np.arange(len(proba)), targets]
    table["p_predicted"] = proba.max(axis=1)
    table["in_training"] = in_training
    return table


def per_class(table: pd.DataFrame, columns: list[str]) -> dict:
    """Mean of ``columns`` per true class and over all cells, with the cell count, the model's accuracy and the
    median pointing ratio (a mean of ratios leans on the cells with the smallest masks)."""
    def summary(group: pd.DataFrame) -> dict:
        medians = {f"{c}_median": mean_or_none(group[c].dropna().median()) for c in columns if c == "pointing_ratio"}
        return {"cells": len(group), "accuracy": round(float((group["predicted"] == group["label"]).mean()), 4),
                **{c: mean_or_none(group[c].to_numpy()) for c in columns}, **medians}
    return {"per_class": {str(k): summary(g) for k, g in table.groupby("label")}, "all": summary(table)}


def outcome(cells: Cells, table: pd.DataFrame, columns: list[str], device: str, started: float) -> dict:
    """What every map summary reports: cells trained on, skipped files, per-class means, device and time."""
    return {"cells_in_training": int(table["in_training"].sum()), "device": device,
            "skipped": [{"path": p.path, "reason": p.reason} for p in cells.skipped],
            **per_class(table, columns), "seconds": round(time.perf_counter() - started, 1)}


def save_maps(out: Path, name: str, cells: Cells, maps: np.ndarray, table: pd.DataFrame, summary: dict,
              classes: list[str], per_class: int, title: str, colour_label: str, signed: bool) -> None:
    """Write maps.npy, cells.csv, summary.json and ``name``.png/.svg, warning first if some cells were trained on."""
    if summary["cells_in_training"]:
        warn(f"{summary['cells_in_training']} of the {len(table)} cells are ones the model or its network trained "
             "on (cells.csv: in_training); their maps show what it learnt from them, not how it generalises")
    atomic_save_array(out / "maps.npy", maps.astype(np.float16))
    atomic_write_text(out / "cells.csv", table.to_csv(index=False))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    plot_maps(cells, maps, table, classes, per_class, out / f"{name}.png", title, colour_label, signed)


@dataclass
class Explained:
    folder: Path
    cells: int
    summary: dict  # what summary.json holds


def gradcam(checkpoint_or_store: Path, source: Path, out: Path, cfg: RunConfig, backbone: str | None = None,
            overwrite: bool = False) -> Explained:
    """Grad-CAM maps of a fine-tuned checkpoint's head, or of a linear probe on a store's backbone, on a seeded
    per-class sample of the source's split: maps.npy, cells.csv, summary.json, gradcam.png/.svg."""
    started = time.perf_counter()
    settings = cfg.explain.gradcam
    net = None
    if (Path(checkpoint_or_store) / "zarr.json").is_file():  # a store: its probe is fitted once the rest is checked
        store, backbone, _ = probe_source(checkpoint_or_store, backbone)
        made_with = store.meta.get("config")
    else:
        net = from_checkpoint(checkpoint_or_store, backbone)
        made_with = net.made_with
    preprocess = load_config(None, None, base=made_with) if made_with else cfg  # as the network's inputs were
    manifest = read_source(source, preprocess.index)
    chosen = choose_cells(manifest, settings.split, settings.cells_per_class, settings.seed)
    prepare_fresh_dir(out, "Grad-CAM folder", OUTPUTS, overwrite)
    net = net or from_probe(checkpoint_or_store, backbone, cfg.classify.backend, settings.seed)
    cells = read_cells(chosen, manifest, preprocess)
    device = "cuda" if resolve_device(cfg.loader.device) == "gpu" else "cpu"
    images = cells.normalised(net.spec.normalization)
    proba = class_scores(net, images, settings.batch_size, device)
    targets = target_indices(net.classes, cells.table["label"], proba, settings.target)
    say(f"Grad-CAM of {net.backbone} at {net.spec.gradcam_layer} through {net.head_words}: {len(images)} cells")
    maps = gradcam_maps(net, images, targets, settings.batch_size, device)
    table = cell_table(cells, proba, targets, net.classes, net.seen(cells.table))
    table["blank"] = maps.reshape(len(maps), -1).max(axis=1) == 0
    if table["blank"].mean() > 0.25:
        warn(f"{int(table['blank'].sum())} of the {len(table)} maps are zero everywhere: no positive evidence at "
             f"{net.spec.gradcam_layer} at {images.shape[-1]} px (random weights do this, and so does an input so "
             "small that the layer is a grid of few cells)")
    for key, values in pointing(maps, cells.masks).items():
        table[key] = values
    # The same test for one map shared by every cell (their average): what a centre bias alone would score
    table["pointing_ratio_average_map"] = pointing(np.broadcast_to(maps.mean(axis=0), maps.shape),
                                                   cells.masks)["pointing_ratio"]
    columns = ["pointing_ratio", "pointing_ratio_average_map", "energy_in_mask", "mask_share", "blank"]
    sane = settings.sanity and (net.weights.get("pretrained") or net.weights.get("finetuned"))
    if settings.sanity and not sane:
        warn(f"{net.backbone}'s weights are random already ({net.weights['weights']}): no randomisation test")
    if sane:
        randomised = gradcam_maps(net.randomised(settings.seed + 1), images, targets, settings.batch_size, device)
        table["rho_randomised"] = rank_correlation(maps, randomised)  # NaN where either map is blank
        table["randomised_blank"] = randomised.reshape(len(randomised), -1).max(axis=1) == 0
        columns += ["rho_randomised", "randomised_blank"]
    summary = {"backbone": net.backbone, "layer": net.spec.gradcam_layer, "head": net.head_words,
               "weights": net.weights["weights"], "weights_words": weights_words(net.weights),
               "split": settings.split, "split_protocol": cells.protocol, "target": settings.target,
               **outcome(cells, table, columns, device, started)}
    save_maps(out, "gradcam", cells, maps, table, summary, net.classes, settings.show_per_class,
              title=(f"Grad-CAM of {net.backbone} ({net.spec.gradcam_layer}), {settings.target} class, through "
                     f"{net.head_words}\nweights: {summary['weights_words']} ({net.weights['weights']}); cells of "
                     f"split {settings.split} ({cells.protocol}); white line: HSV mask"),
              colour_label="Grad-CAM (each map scaled to 0-1)", signed=False)
    write_run_record(out, "gradcam", cfg, source=str(source), checkpoint_or_store=str(checkpoint_or_store),
                     summary=summary)
    whole = summary["all"]
    say(f"pointing ratio (map energy on the cell / the cell's share of the image) {whole['pointing_ratio']} (one "
        f"average map for every cell: {whole['pointing_ratio_average_map']}), "
        f"head accuracy on these cells {whole['accuracy']}"
        + (f"; rank correlation with the re-initialised network {whole['rho_randomised']} (its maps blank for "
           f"{whole['randomised_blank']:.0%} of the cells)" if sane else ""))
    return Explained(out, len(table), summary)
