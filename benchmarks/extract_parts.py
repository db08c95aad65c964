"""The extraction stage taken apart: each backbone's forward pass and the store write, timed on their own.

Each part has its naive counterpart in the same run (the backbone: eager fp32, unfused, NCHW, batch 32; the
store: ``np.save`` of the same features) and, for the backbones on each engine, the fraction of the arithmetic
floor reached in the precision it ran in.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from aml_rapids.config import RunConfig, load_config
from aml_rapids.data.manifest import Manifest
from aml_rapids.features.backbones import get_spec
from aml_rapids.features.extract import Backbones
from aml_rapids.features.plan import STATUS_OK, pad_segments, plan_rows
from aml_rapids.features.store import FeatureStore
from aml_rapids.features.weights import load_backbone
from aml_rapids.features.writer import ChunkWriter

from .floor import DTYPES, flops_per_image, matmul_rate
from .harness import Variant, throughputs


def bench_config(backbones: list[str], device: str, batch_size: int, compiled: bool = False,
                 compile_mode: str = "default", engine: str = "torch", precision: str | None = None,
                 weights: dict[str, str] | None = None) -> RunConfig:
    """The config every extraction benchmark uses: random weights (nothing to download; speed does not depend on
    them) unless ``weights`` names a file for a backbone (int8's calibration and its parity check do depend on
    them), float32 store; torch in fp32 on a CPU and bf16 on a GPU unless another engine or precision is named."""
    spec = ", ".join(f"{{name: {b}, weights: '{(weights or {}).get(b, 'none')}'}}" for b in backbones)
    precision = precision or ("bf16" if device == "gpu" else "fp32")
    return load_config(None, [f"features.backbones=[{spec}]", f"loader.device={device}",
                              f"loader.batch_size={batch_size}", "features.chunk_batches=4",
                              "features.store_dtype=float32", f"features.compile={compiled}",
                              f"features.compile_mode={compile_mode}", f"features.engine={engine}",
                              f"features.precision={precision}"])


def _forward(net, images: torch.Tensor, batches: int) -> Callable[[], int]:
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)

    def run() -> int:
        with torch.inference_mode():
            for _ in range(batches):
                net(images)
        sync()
        return len(images) * batches

    return run


def backbone_rows(backbones: list[str], device: str, batch_size: int, repeats: int,
                  prepared: dict[str, Backbones], batches: int = 2) -> list[dict]:
    """Images/s of each backbone's forward pass: naive, and on each engine the extraction variants ran
    (``prepared``: their loaded networks, by variant), each against the floor of the precision it ran in."""
    where = "cuda" if device == "gpu" else "cpu"
    size = load_config().loader.image_size
    precisions = {"fp32"} | {p for b in prepared.values() for p in (i["precision"] for i in b.info.values())}
    rates = {p: matmul_rate(where, p) for p in sorted(precisions) if p in DTYPES}
    images = torch.randn(batch_size, 3, size, size, device=where)
    naive_images = torch.randn(32, 3, size, size, device=where)
    rows = []
    for name in backbones:
        naive = load_backbone(name, "none")[0].to(where).eval()
        flops = flops_per_image(naive, size, where)
        runs = {"naive": Variant(_forward(naive, naive_images, batches))}
        for variant, loaded in prepared.items():
            runner = loaded.nets[name]
            laid_out = images.contiguous(memory_format=torch.channels_last if runner.channels_last else
                                         torch.contiguous_format)
            runs[variant] = Variant(_forward(runner, laid_out, batches))
        timings = throughputs(runs, repeats)
        base = timings["naive"]
        rows.append({"variant": f"{name} forward, naive (fp32 eager, batch 32)", **base, "backbone": name,
                     "precision": "fp32", "floor_images_per_s": rates["fp32"]["flops_per_s"] / flops,
                     "matmul": rates["fp32"], "x_naive": 1.0})
        for variant, loaded in prepared.items():
            info, timing = loaded.info[name], timings[variant]
            rate = rates.get(info["precision"])
            how = f"{'engine auto: ' if variant.endswith('engine auto') else ''}{info['engine']} {info['precision']}"
            rows.append({"variant": f"{name} forward, aml-rapids {how} (batch {batch_size})", **timing, "backbone": name, "precision": info["precision"],
                         "engine_check": loaded.checks.get(name), "matmul": rate,
                         "floor_images_per_s": rate and rate["flops_per_s"] / flops,
                         "x_naive": timing["items_per_s"] / base["items_per_s"]})
    for row in rows:
        if row["floor_images_per_s"]:
            row["floor_fraction"] = row["items_per_s"] / row["floor_images_per_s"]
    return rows


STORE_ROWS = 16384  # enough for a steady write rate; the full 81,214 x 7,424 float32 would be 2.4 GB per repeat


def store_rows(manifest: Manifest, backbones: list[str], repeats: int) -> list[dict]:
    """Rows/s written: the Zarr store, chunk by chunk through the extraction's writer threads, against np.save."""
    cfg = bench_config(backbones, "cpu", 256)
    dims = {name: get_spec(name).dim for name in backbones}
    rows = pad_segments(plan_rows(manifest.table.iloc[:STORE_ROWS], cfg), cfg.chunk_rows)
    chunk = {name: np.random.default_rng(0).normal(size=(cfg.chunk_rows, d)).astype(np.float32) for name, d in dims.items()}
    status = np.full(cfg.chunk_rows, STATUS_OK, dtype=np.int8)
    meta = {"chunk_rows": cfg.chunk_rows, "store_dtype": cfg.features.store_dtype,
            "backbones": {name: {"dim": d} for name, d in dims.items()}}

    def zarr_write() -> int:
        folder = Path(tempfile.mkdtemp())
        try:
            store = FeatureStore.create(folder / "bench.zarr", rows, dims, meta)
            with ChunkWriter(store, workers=cfg.features.writers) as writer:
                for k in range(store.n_chunks):
                    writer.put(k, chunk, status)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return len(rows)

    def numpy_save() -> int:
        folder = Path(tempfile.mkdtemp())
        try:
            for name, values in chunk.items():
                np.save(folder / f"{name}.npy", np.concatenate([values] * (len(rows) // cfg.chunk_rows)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return len(rows)

    timings = throughputs({"naive": Variant(numpy_save), "zarr": Variant(zarr_write)}, repeats)
    base, zarr = timings["naive"], timings["zarr"]
    return [{"variant": f"store write, naive (np.save float32) {'+'.join(backbones)}", **base, "x_naive": 1.0},
            {"variant": f"store write, Zarr v3 chunks of {cfg.chunk_rows} rows (float32, "
                        f"{cfg.features.writers} writer threads)", **zarr,
             "x_naive": zarr["items_per_s"] / base["items_per_s"]}]
