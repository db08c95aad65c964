"""Loader stage: DALI (CPU-only or GPU) against PIL + torchvision in a DataLoader, same images, same run.

Two naive baselines: ``naive`` is exactly the field's usual loader (Resize/ToTensor/Normalize); ``naive-full``
also does the method's HSV mask and augmentation, so the DALI graph is compared like for like. On a GPU the
full graph runs once more with DALI's mixed decoder instead of the CPU decoder (``loader.gpu_decode``). Each epoch is
timed whole (its images/s), the variants taking turns; the last epoch's set-up (time to the first batch, and for
DALI its parts) and rate after it are kept too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from aml_rapids.config import RunConfig, SegmentationConfig, load_config
from aml_rapids.data.manifest import Manifest
from aml_rapids.loader.loader import CellLoader
from aml_rapids.provenance import usable_cores

from .harness import WARMUP_CELLS, Variant, head, throughputs

NORMALIZE = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def pil_hsv_mask(image: Image.Image, seg: SegmentationConfig) -> Image.Image:
    """The HSV mask the naive way: PIL's HSV conversion (0-255 scales) and NumPy thresholds."""
    hsv = np.asarray(image.convert("HSV"), dtype=np.float32)
    hue, sat, val = hsv[..., 0] * 360 / 255, hsv[..., 1] / 255, hsv[..., 2] / 255
    keep = (hue >= seg.hue_min) & (hue <= seg.hue_max) & (sat >= seg.saturation_min) & (val <= seg.value_max)
    return Image.fromarray(np.asarray(image) * keep[..., None].astype(np.uint8))


class NaiveCells(Dataset):
    def __init__(self, paths, full: bool, seg: SegmentationConfig, size: int):
        self.paths, self.full, self.seg = paths, full, seg
        steps = [transforms.RandomAffine(degrees=10, scale=(0.9, 1.1)), transforms.RandomHorizontalFlip(),
                 transforms.RandomVerticalFlip()] if full else []
        self.transform = transforms.Compose(steps + [transforms.Resize(size), transforms.ToTensor(), NORMALIZE])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = Image.open(self.paths[i]).convert("RGB")
        if self.full:
            image = pil_hsv_mask(image, self.seg)
        return self.transform(image), i


def naive_batches(manifest: Manifest, full: bool, cfg: RunConfig, workers: int):
    data = NaiveCells(manifest.paths(), full, cfg.segmentation, cfg.loader.image_size)
    loader = DataLoader(data, batch_size=32, num_workers=workers, pin_memory=torch.cuda.is_available())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return (images.to(device, non_blocking=True) for images, _ in loader)


class DaliBatches:
    """Each call: a fresh CellLoader's batches over a manifest; the last loader is kept for its start-up split."""

    def __init__(self, cfg: RunConfig, augment: bool):
        self.cfg, self.augment, self.loader = cfg, augment, None

    def __call__(self, manifest: Manifest) -> Iterator[torch.Tensor]:
        self.loader = CellLoader(manifest.table, manifest.root, self.cfg, augment=self.augment)
        return (batch.images["imagenet"] for batch in self.loader)


class Epoch:
    """One pass over a loader's batches, returning the images seen; it keeps when the first batch arrived
    (worker start, file checks, augmentation draws, pipeline build) to tell set-up from steady throughput."""

    def __init__(self, batches: Callable[[], Iterator[torch.Tensor]]):
        self.batches = batches
        self.first_batch_seconds = self.steady_per_s = None

    def __call__(self) -> int:
        start, seen, first_rows = time.perf_counter(), 0, 0
        for images in self.batches():
            if not seen:
                self.first_batch_seconds, first_rows = time.perf_counter() - start, len(images)
            seen += len(images)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the last batches' device work is part of the epoch
        rest = time.perf_counter() - start - (self.first_batch_seconds or 0)
        self.steady_per_s = (seen - first_rows) / rest if rest > 0 else None
        return seen


def run(manifest: Manifest, naive_manifest: Manifest, device: str, repeats: int, batch_size: int) -> list[dict]:
    """Every variant's images/s; the naive loaders read ``naive_manifest`` (the first cells, when they would
    take too long on all of them). Each variant warms up on its first ``WARMUP_CELLS`` cells."""
    workers = usable_cores()
    cfg = load_config(None, [f"loader.device={device}", f"loader.batch_size={batch_size}"])
    plain = cfg.model_copy(update={"segmentation": cfg.segmentation.model_copy(update={"enabled": False})})
    mixed = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"gpu_decode": True})})
    variants = {  # name: (cells it reads, batches of a manifest)
        "naive (PIL+torchvision, resize+normalise)": (naive_manifest, lambda m: naive_batches(m, False, cfg, workers)),
        "naive-full (+HSV mask, affine, flips)": (naive_manifest, lambda m: naive_batches(m, True, cfg, workers)),
        f"dali-{device} resize+normalise": (manifest, DaliBatches(plain, False)),
        f"dali-{device} +HSV mask": (manifest, DaliBatches(cfg, False)),
        f"dali-{device} +HSV mask+augment": (manifest, DaliBatches(cfg, True)),
    }
    if device == "gpu":
        variants[f"dali-{device} +HSV mask+augment, mixed decoder"] = (manifest, DaliBatches(mixed, True))
    epochs = {name: Epoch(lambda cells=cells, batches=batches: batches(cells))
              for name, (cells, batches) in variants.items()}
    timings = throughputs({name: Variant(epochs[name], Epoch(lambda cells=cells, batches=batches:
                                                               batches(head(cells, WARMUP_CELLS))))
                           for name, (cells, batches) in variants.items()}, repeats)
    rows = []
    for name, (_, batches) in variants.items():  # the last timed epoch's start and rate after it
        rows.append({"variant": name, **timings[name], "first_batch_seconds": epochs[name].first_batch_seconds,
                     "after_first_batch_per_s": epochs[name].steady_per_s})
        if isinstance(batches, DaliBatches):
            rows[-1]["startup_seconds"] = batches.loader.startup
    naive, naive_full = rows[0]["items_per_s"], rows[1]["items_per_s"]
    for row in rows:
        row["x_naive"] = row["items_per_s"] / naive
        row["x_naive_full"] = row["items_per_s"] / naive_full
    return rows
