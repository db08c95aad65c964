"""Extraction stage, end to end into storage: aml-rapids (DALI -> backbones -> Zarr) against the naive
pipeline (PIL + DataLoader + fp32 NCHW batch 32 -> NumPy arrays), same images, same backbones, same run.

Networks are built once per variant, outside the timing, as a long run or a worker holding them would. The
warm-up extracts the first ``WARMUP_CELLS`` cells (pipeline build, cuDNN autotuning, and the ``torch.compile``
of the compiled variant): its wall time is reported separately as ``first_run_seconds``. A timed run is the whole
``extract`` call (store creation included). Each aml-rapids row also keeps, over its timed runs, the extraction
loop alone (medians: ``loop_seconds``, ``loop_images_per_s``), the steady rate once the loader's first batch is in
hand (``after_first_batch_per_s``: every cell over the loop less its start-up, i.e. the pass setup and the
loader's start; the median, and each run's in ``after_first_batch_per_s_runs``), and where the last run's time
went (``breakdown``). Loading each variant's networks (an engine's conversion or its cached artefact, the parity
check, and for ``auto`` its measurements) is timed apart as ``prepare_seconds``.
"""

from __future__ import annotations

import shutil
import time
import tempfile
from pathlib import Path
from statistics import median

import numpy as np
import torch
from torch.utils.data import DataLoader

from aml_rapids.config import RunConfig, load_config
from aml_rapids.data.manifest import Manifest
from aml_rapids.errors import EngineError
from aml_rapids.features.engines import calibration_cells
from aml_rapids.features.engines.select import REFERENCE, candidates
from aml_rapids.features.extract import Backbones, ExtractSummary, extract, load_backbones
from aml_rapids.features.weights import load_backbone
from aml_rapids.provenance import usable_cores

from .extract_parts import backbone_rows, bench_config, store_rows
from .harness import WARMUP_CELLS, Variant, head, throughputs
from .loader_bench import NaiveCells


def naive_extract(manifest: Manifest, nets: dict[str, torch.nn.Module], size: int) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = NaiveCells(manifest.paths(), False, None, size)
    loader = DataLoader(data, batch_size=32, num_workers=usable_cores())
    out = {name: [] for name in nets}
    with torch.inference_mode():
        for images, _ in loader:
            images = images.to(device)
            for name, net in nets.items():
                out[name].append(net(images).cpu().numpy())
    return len(np.concatenate(next(iter(out.values()))))


class AmlExtract:
    """One extraction into a fresh store, returning the rows written; keeps every run's summary."""

    def __init__(self, cfg: RunConfig, prepared: Backbones):
        self.cfg, self.prepared = cfg, prepared
        self.summaries: list[ExtractSummary] = []

    def __call__(self, manifest: Manifest) -> int:
        store = Path(tempfile.mkdtemp()) / "bench.zarr"
        try:
            self.summaries.append(extract(manifest, store, self.cfg, backbones=self.prepared))
        finally:
            shutil.rmtree(store.parent, ignore_errors=True)
        return self.summaries[-1].rows_written


def variant_name(device: str, mode: str, engine: str | None = None) -> str:
    """``mode``: ``eager``, or the torch.compile mode of a compiled variant; ``engine``: another engine's
    variant, as ``ENGINE PRECISION`` (or ``auto``)."""
    how = engine or {"eager": "eager", "default": "torch.compile"}.get(mode, f"torch.compile {mode}")
    return f"aml-rapids {device} -> Zarr, HSV mask, {how}"


def all_engines(device: str) -> list[str]:
    """Every engine and precision that could run on ``device``, and auto: what ``--engines all`` times."""
    where = "cuda" if device == "gpu" else "cpu"
    return [f"{c.engine}:{c.precision}" for c in candidates("auto", "auto", where) + candidates("auto", "int8", where)
            if c != REFERENCE] + ["auto:auto"]


def run(manifest: Manifest, naive_manifest: Manifest, device: str, repeats: int, batch_size: int,
        backbones: list[str], warmup: bool, modes: tuple[str, ...] = ("eager", "default"),
        engines: tuple[str, ...] = (), weights: dict[str, str] | None = None) -> list[dict]:
    """The naive pipeline and aml-rapids in each of ``modes`` (PyTorch eager, or a torch.compile mode, whose
    compile is part of the warm-up) and on each of ``engines`` (``ENGINE:PRECISION``, their conversion and
    parity check before the timing), in turns; each against the floor of all its backbones (their FLOPs over
    the matrix-multiply rate of the precision each ran in, from the backbone rows of the same run). An engine
    this machine cannot run, or whose features the parity guard refuses, is reported and left out. ``weights``:
    files for some backbones (the others, and the naive pipeline's, are random)."""
    where = "cuda" if device == "gpu" else "cpu"
    size = load_config().loader.image_size
    nets = {name: load_backbone(name, "none")[0].to(where).eval() for name in backbones}
    naive = f"naive (PIL+DataLoader, fp32 NCHW b32 -> NumPy) {'+'.join(backbones)}"
    variants = {naive: Variant(lambda: naive_extract(naive_manifest, nets, size),
                               lambda: naive_extract(head(naive_manifest, WARMUP_CELLS), nets, size))}
    configs = {variant_name(device, mode): bench_config(backbones, device, batch_size, mode != "eager",
                                                         mode if mode != "eager" else "default", weights=weights)
               for mode in modes}
    for spec in engines:
        engine, precision = spec.split(":")
        configs[variant_name(device, "eager", spec.replace(":", " ") if engine != "auto" else "engine auto")] = (
            bench_config(backbones, device, batch_size, engine=engine, precision=precision, weights=weights))
    extractions, prepared, prepare_seconds = {}, {}, {}
    for name, cfg in configs.items():
        start = time.perf_counter()
        try:
            loaded = load_backbones(cfg, where, lambda norms, c=cfg: calibration_cells(manifest, c, norms))
        except EngineError as exc:  # not installed or not on this device, or refused by the parity guard
            print(f"extract  {name}: not run here ({exc})", flush=True)
            continue
        prepare_seconds[name] = time.perf_counter() - start
        if "torch.compile" not in name:
            prepared[name] = loaded
        extractions[name] = run_once = AmlExtract(cfg, loaded)
        variants[name] = Variant(lambda r=run_once: r(manifest), lambda r=run_once: r(head(manifest, WARMUP_CELLS)))
    timings = throughputs(variants, repeats, warmup)
    rows = [{"variant": name, **timing} for name, timing in timings.items()]
    for row in rows[1:]:  # the timed runs' extraction loops alone (medians, and each run's steady rate)
        timed = extractions[row["variant"]].summaries[-repeats:]
        steady = [s.after_start_per_s for s in timed]
        loaded = extractions[row["variant"]].prepared
        row.update(loop_seconds=median(s.seconds for s in timed),
                   loop_images_per_s=median(s.images_per_s for s in timed), after_first_batch_per_s=median(steady),
                   after_first_batch_per_s_runs=steady, breakdown=timed[-1].seconds_in,
                   engines={n: f"{i['engine']} {i['precision']}" for n, i in loaded.info.items()},
                   engine_checks=loaded.checks, prepare_seconds=prepare_seconds[row["variant"]])
    parts = backbone_rows(backbones, device, batch_size, repeats, prepared)
    floors = {(r["backbone"], r["precision"]): r["floor_images_per_s"] for r in parts}
    for row in rows:  # all the backbones one after another, each at the floor of the precision it ran in
        ran = {n: e.split()[1] for n, e in row.get("engines", {b: "torch fp32" for b in backbones}).items()}
        each = [floors.get((name, precision)) for name, precision in ran.items()]
        floor = 1 / sum(1 / f for f in each) if all(each) else None
        row.update(x_naive=row["items_per_s"] / rows[0]["items_per_s"], floor_images_per_s=floor)
        if floor:
            row["floor_fraction"] = row["items_per_s"] / floor
    return rows + parts + store_rows(manifest, backbones, repeats)
