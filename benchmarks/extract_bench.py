"""Extraction stage, end to end into storage: aml-rapids (DALI -> backbones -> Zarr) against the naive
pipeline (PIL + DataLoader + fp32 NCHW batch 32 -> NumPy arrays), same images, same backbones, same run."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from aml_rapids.config import load_config
from aml_rapids.data.manifest import Manifest
from aml_rapids.features.extract import extract
from aml_rapids.features.weights import load_backbone
from aml_rapids.loader.loader import usable_cores

from .extract_parts import backbone_rows, bench_config, store_rows
from .harness import throughput
from .loader_bench import NaiveCells


def naive_extract(manifest: Manifest, backbones: list[str], size: int) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    nets = [load_backbone(name, "none")[0].to(device) for name in backbones]
    data = NaiveCells(manifest.paths(), False, None, size)
    loader = DataLoader(data, batch_size=32, num_workers=usable_cores())
    out = {name: [] for name in backbones}
    with torch.inference_mode():
        for images, _ in loader:
            images = images.to(device)
            for name, net in zip(backbones, nets):
                out[name].append(net(images).cpu().numpy())
    return len(np.concatenate(out[backbones[0]]))


def aml_extract(manifest: Manifest, backbones: list[str], device: str, batch_size: int, segment: bool) -> int:
    store = Path(tempfile.mkdtemp()) / "bench.zarr"
    try:
        summary = extract(manifest, store, bench_config(backbones, device, batch_size, segment))
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)
    return summary.rows_written


def run(manifest: Manifest, naive_manifest: Manifest, device: str, repeats: int, batch_size: int,
        backbones: list[str], warmup: bool) -> list[dict]:
    size = load_config().loader.image_size
    variants = {
        f"naive (PIL+DataLoader, fp32 NCHW b32 -> NumPy) {'+'.join(backbones)}":
            lambda: naive_extract(naive_manifest, backbones, size),
        f"aml-rapids {device} -> Zarr, resize+normalise": lambda: aml_extract(manifest, backbones, device, batch_size, False),
        f"aml-rapids {device} -> Zarr, +HSV mask": lambda: aml_extract(manifest, backbones, device, batch_size, True),
    }
    rows = [{"variant": name, **throughput(fn, repeats, warmup)} for name, fn in variants.items()]
    for row in rows:
        row["x_naive"] = row["items_per_s"] / rows[0]["items_per_s"]
    return rows + backbone_rows(backbones, device, batch_size, repeats) + store_rows(manifest, backbones, repeats)
