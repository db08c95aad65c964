"""Timing, synthetic inputs and result records shared by every benchmark stage."""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aml_rapids.config import IndexConfig
from aml_rapids.data.manifest import Manifest, build_manifest, read_manifest, write_manifest
from aml_rapids.data.synthetic import CLASSES, write_demo_dataset
from aml_rapids.provenance import git_commit, machine_info, software_versions, usable_cores

RESULTS = Path(__file__).resolve().parent / "results" / "results.jsonl"
WARMUP_CELLS = 4096  # a stage's warm-up reads this many cells: start-up, autotuning and compilation, not a full pass


def head(manifest: Manifest, count: int | None) -> Manifest:
    """The manifest's first ``count`` cells (all when None)."""
    return Manifest(manifest.table.iloc[:count].reset_index(drop=True), manifest.root, manifest.meta)


def synthetic_manifest(count: int, cache: Path) -> Manifest:
    """The first ``count`` of a set of synthetic 144x144 TIFF cells in ``cache``: the smallest set already drawn
    and indexed there that is large enough (e.g. the full-size set of an earlier stage), else a new one."""
    per_patient = 50
    patients = max(1, -(-count // (len(CLASSES) * per_patient)))
    drawn = [int(m[1]) for p in cache.glob("synthetic-*.parquet")
             if (m := re.fullmatch(rf"synthetic-(\d+)x{per_patient}", p.stem))]
    patients = min((n for n in drawn if n >= patients), default=patients)
    folder = cache / f"synthetic-{patients}x{per_patient}"
    indexed = folder.with_suffix(".parquet")
    if indexed.is_file():
        manifest = read_manifest(indexed)
    else:
        if not folder.is_dir():
            write_demo_dataset(folder, patients, per_patient, workers=usable_cores())
        manifest = build_manifest(folder, IndexConfig(verify_decode=False)).manifest
        write_manifest(manifest, indexed)
    return head(manifest, count)


@dataclass
class Variant:
    """One way of doing a stage's work: ``run`` returns the items it processed; ``warmup_run``, if given, warms
    up on less (e.g. the same work on fewer items)."""

    run: Callable[[], int]
    warmup_run: Callable[[], int] | None = None


def throughputs(variants: dict[str, Variant], repeats: int, warmup: bool = True) -> dict[str, dict]:
    """Each variant's median over ``repeats`` timed runs, the variants taking turns: round by round, forward then
    backward (A B, B A, ...), so that a machine whose speed drifts during a run favours none of them (the 2-core
    machine's matrix-multiply rate fell 10-15% over 90 s of load). Each warm-up is timed on its own, start-up and
    any compilation included (``first_run_seconds`` for ``first_run_items``); without warm-up the timed runs
    include start-up (pipeline build, first calls)."""
    first = dict.fromkeys(variants)
    first_items = dict.fromkeys(variants)
    if warmup:
        for name, variant in variants.items():
            start = time.perf_counter()
            first_items[name] = (variant.warmup_run or variant.run)()
            first[name] = time.perf_counter() - start
    seconds = {name: [] for name in variants}
    items = dict.fromkeys(variants, 0)
    names = list(variants)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            items[name] = variants[name].run()
            seconds[name].append(time.perf_counter() - start)
    timings = {}
    for name in names:
        median = statistics.median(seconds[name])
        timings[name] = {"items": items[name], "seconds_median": median, "seconds": seconds[name],
                         "items_per_s": items[name] / median, "warmup": warmup, "first_run_seconds": first[name],
                         "first_run_items": first_items[name]}
    return timings


def append_results(stage: str, rows: list[dict], params: dict, path: Path = RESULTS) -> None:
    """One JSON line per measured variant, each with machine, versions, commit and parameters."""
    path.parent.mkdir(parents=True, exist_ok=True)
    machine, versions, commit = machine_info(), software_versions(), git_commit()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with path.open("a") as fh:
        for row in rows:
            fh.write(json.dumps({"time_utc": stamp, "stage": stage, **row, "params": params, "machine": machine,
                                 "versions": versions, "git_commit": commit}) + "\n")
