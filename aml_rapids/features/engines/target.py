"""What an engine is asked to run: one backbone's network, where, on which cells it is checked, and how."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from ...config import RunConfig
from ...data.manifest import Manifest
from ...loader.loader import CellLoader
from ...loader.pipeline import Normalization


@dataclass
class Calibration:
    """Cells every engine is checked on (the first ``features.calibration_cells``) and int8 calibrated on (all),
    as each normalisation key's network reads them: (N, 3, S, S) float32 on the networks' device."""

    images: dict[str, torch.Tensor]
    digest: str  # sha256 over the cells' content hashes: an int8 model is made of these cells


def asks_int8(cfg: RunConfig) -> bool:
    return "int8" in {cfg.features.precision, *(b.precision for b in cfg.features.backbones)}


def calibration_cells(manifest: Manifest, cfg: RunConfig, normalizations: dict[str, Normalization],
                      count: int | None = None) -> Calibration:
    """A seeded sample of ``count`` training cells (all cells where there is no split), preprocessed as
    extraction does, without augmentation. ``count`` defaults to ``features.calibration_cells``, or where the
    config asks for int8 to ``features.int8_calibration_cells`` if that is more."""
    table = manifest.table
    if "split" in table and (table["split"] == "train").any():
        table = table[table["split"] == "train"]
    if count is None:
        count = max(cfg.features.calibration_cells, cfg.features.int8_calibration_cells if asks_int8(cfg) else 0)
    chosen = table.sample(n=min(count, len(table)), random_state=cfg.features.seed)
    return calibration_of(chosen.sort_index(), manifest, cfg, normalizations)


def calibration_of(table: pd.DataFrame, manifest: Manifest, cfg: RunConfig,
                   normalizations: dict[str, Normalization]) -> Calibration:
    batches = list(CellLoader(table, manifest.root, cfg, augment=False, normalizations=normalizations))
    if not batches:
        raise ValueError(f"none of the {len(table)} calibration cells could be read")
    used = table.iloc[np.concatenate([b.positions for b in batches])]
    digest = hashlib.sha256("".join(sorted(used["sha256"])).encode()).hexdigest()
    return Calibration({key: torch.cat([b.images[key].float() for b in batches]) for key in normalizations}, digest)


@dataclass
class Target:
    """One backbone for an engine to run: its registry network (fp32, eval mode, on ``device``), what makes its
    converted form unique, and the calibration cells as it reads them."""

    backbone: str
    net: nn.Module
    weights_sha256: str | None
    image_size: int
    device: str  # "cpu" or "cuda"
    batch_size: int
    calibration: torch.Tensor | None = None  # the cells the parity guard checks on
    calibration_digest: str | None = None  # of ``quantize_cells``: an int8 network is made of them
    quantize_cells: torch.Tensor | None = None  # the cells int8 is calibrated on
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"
    min_cosine: dict[str, float] = field(default_factory=dict)  # the parity guard's thresholds, where not its own

    def cache_fields(self, engine: str, precision: str, versions: dict) -> dict:
        fields = {"backbone": self.backbone, "weights_sha256": self.weights_sha256, "engine": engine,
                  "precision": precision, "image_size": self.image_size, "device": self.device, "versions": versions}
        if precision == "int8":
            fields["calibration"] = self.calibration_digest
        return fields

    def example(self, rows: int = 1) -> torch.Tensor:
        return torch.zeros(rows, 3, self.image_size, self.image_size, device=self.device)
