"""The cells an explanation is about: a seeded per-class sample of one split of a manifest (or of a folder or
CSV indexed on the spot), run through extraction's own DALI graph without augmentation, each with its HSV
foreground mask at the network's input size (what the pointing test measures against)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..config import RunConfig
from ..data.manifest import Manifest
from ..data.scan import Problem
from ..errors import ConfigError, DataError
from ..evaluate.report import split_protocol
from ..loader.loader import CellLoader
from ..loader.pipeline import PIXELS, Normalization
from ..loader.preview import pick_examples
from ..logs import say, warn



@dataclass
class Cells:
    table: pd.DataFrame  # the manifest rows of the cells that could be read, in order
    images: torch.Tensor  # (N, 3, S, S) float32 RGB in [0, 1], segmented and resized as the networks read them
    masks: np.ndarray  # (N, S, S) bool: the HSV foreground mask, resized to the network's input
    protocol: str  # how the source was split ("image-level split", ...; "unsplit")
    skipped: list[Problem] = field(default_factory=list)  # chosen cells whose files could not be read

    def normalised(self, norm: Normalization) -> torch.Tensor:
        return normalise(self.images, norm)


def normalise(pixels: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """RGB in [0, 1] (N, 3, H, W) normalised as ``norm`` says, on the pixels' device."""
    mean = torch.tensor(norm.mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def choose_cells(manifest: Manifest, split: str, per_class: int, seed: int) -> pd.DataFrame:
    """A seeded sample of ``per_class`` cells of every class of ``split`` (``all``: any split)."""
    table = manifest.table
    if "split" not in table or table["split"].isna().all():
        if split != "all":
            say(f"the source has no split: choosing among all its cells (explain.gradcam.split {split!r} ignored)")
    elif split != "all":
        if not (table["split"] == split).any():
            raise ConfigError(f"the source has no cells in split {split!r} (it has: "
                              f"{', '.join(sorted(set(table['split'].dropna())))}); set explain.gradcam.split to one "
                              "of them, or all")
        table = table[table["split"] == split]
    return pick_examples(table, per_class, seed)


def read_cells(table: pd.DataFrame, manifest: Manifest, cfg: RunConfig) -> Cells:
    """Decode, segment and resize ``table``'s cells on the CPU graph (one a batch: its mask view is the cell's
    own size), keeping their masks; unreadable files are skipped and listed."""
    one = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"device": "cpu", "batch_size": 1})})
    loader = CellLoader(table, manifest.root, one, augment=False, normalizations={"pixels": PIXELS}, debug=True)
    size = cfg.loader.image_size
    images, masks, positions = [], [], []
    for batch in loader:
        images.append(batch.images["pixels"].float())
        mask = torch.as_tensor(batch.views["mask"]).permute(0, 3, 1, 2).float()
        masks.append(torch.nn.functional.interpolate(mask, size=(size, size), mode="nearest")[:, 0] > 0.5)
        positions.extend(batch.positions.tolist())
    if not positions:
        raise DataError(f"none of the {len(table)} chosen cells could be read: "
                        + "; ".join(f"{p.path}: {p.reason}" for p in loader.failures[:3]))
    if loader.failures:
        warn(f"{len(loader.failures)} of the {len(table)} chosen cells could not be read and are left out "
             f"(summary.json: skipped), e.g. {loader.failures[0].path}: {loader.failures[0].reason}")
    return Cells(table.iloc[positions].reset_index(drop=True), torch.cat(images), torch.cat(masks).numpy(),
                 split_protocol(manifest.meta.get("split")), list(loader.failures))
