"""Faults around the feature store, injected at chosen points: SIGKILL during creation, extraction and append,
a full disk during creation and append, and two writers at once. Each ends in a store identical, file for file,
to an uninterrupted run's, or in a clear refusal.

Writers run as separate processes forked from a server that imported aml-rapids once (multiprocessing's
forkserver, with the modules preloaded): a kill is a real SIGKILL and a lock is held by another process, without
paying torch's import in every trial. The fault is injected into zarr's one function that writes a file
(``zarr.storage._local._put``), so the Nth write of a run, whatever it writes, can be the last.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import zarr.storage._local as zarr_local

from aml_rapids.config import IndexConfig, load_config
from aml_rapids.data.manifest import build_manifest, read_manifest, write_manifest
from aml_rapids.data.splits import make_split
from aml_rapids.data.synthetic import write_demo_dataset
from aml_rapids.errors import OutputError
from aml_rapids.features.extract import extract
from aml_rapids.features.store import JOURNAL, FeatureStore, StoreError, partial_path

SETTINGS = {"features.backbones": "[{name: tiny, weights: none, engine: torch, precision: fp32}]", "loader.batch_size": 8,
            "features.chunk_batches": 1, "loader.image_size": 32, "loader.device": "cpu", "loader.num_threads": 1,
            "features.writers": 1}
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["aml_rapids.cli", "aml_rapids.features.extract", "typer.testing", __name__])


def config():
    return load_config(None, [f"{k}={v}" for k, v in SETTINGS.items()])


def cli_args(manifest: Path, store: Path) -> list[str]:
    return ["extract", str(manifest), "-s", str(store), *sum((["--set", f"{k}={v}"] for k, v in SETTINGS.items()), [])]


def _writer(mode: str, at: int, manifest: str, store: str, result: str) -> None:
    """One extraction through the CLI, in its own process; ``mode``: ``count`` records every file zarr writes,
    ``kill`` SIGKILLs the process at write ``at``, ``slow`` makes each feature chunk write take 0.1 s."""
    from typer.testing import CliRunner

    from aml_rapids.cli import app

    real, lock, written = zarr_local._put, threading.Lock(), []

    def put(path, value, exclusive=False):
        with lock:
            written.append(os.path.relpath(path, Path(store).parent))
            n = len(written)
        if mode == "kill" and n == at:
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "slow" and "/features/" in str(path):
            time.sleep(0.1)
        return real(path, value, exclusive=exclusive)

    zarr_local._put = put
    outcome = CliRunner().invoke(app, cli_args(Path(manifest), Path(store)))
    Path(result).write_text(json.dumps({"code": outcome.exit_code, "output": outcome.output, "written": written}))


def run_writer(mode: str, manifest: Path, store: Path, at: int = 0) -> tuple[int, dict | None]:
    result = store.with_name(store.name + ".result.json")
    result.unlink(missing_ok=True)
    proc = CTX.Process(target=_writer, args=(mode, at, str(manifest), str(store), str(result)))
    proc.start()
    proc.join(120)
    assert proc.exitcode is not None, "writer hung"
    return proc.exitcode, json.loads(result.read_text()) if result.exists() else None


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store but its root attributes (which hold times), and what those say of the manifests."""
    files = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
             if p.is_file() and p.relative_to(path) != Path("zarr.json")}
    manifests = FeatureStore.open(path).meta["manifests"]
    files["manifests"] = json.dumps([(m["digest"], m["rows"]) for m in manifests]).encode()
    return files


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """A first manifest (2 patients a class, split) and a second listing those cells as they were plus a third
    patient a class, split apart (extracting it appends them); and the uninterrupted stores of each: ``first``,
    and ``both`` (first, then the second appended)."""
    root = tmp_path_factory.mktemp("cohorts")
    index = IndexConfig(verify_decode=False)
    split = load_config(None, ["split.method=image", "split.allow_incomplete=true"]).split
    write_demo_dataset(root / "data", 2, 5, seed=1)
    first = build_manifest(root / "data", index).manifest
    first.table = make_split(first.table, split).table
    write_manifest(first, root / "first.parquet")
    write_demo_dataset(root / "data", 3, 5, seed=1)
    both = build_manifest(root / "data", index).manifest
    new = both.table[~both.table["cell_id"].isin(first.table["cell_id"])]
    both.table = pd.concat([first.table, make_split(new, split).table], ignore_index=True)
    write_manifest(both, root / "both.parquet")
    extract(read_manifest(root / "first.parquet"), root / "first.zarr", config())
    shutil.copytree(root / "first.zarr", root / "both.zarr")
    extract(read_manifest(root / "both.parquet"), root / "both.zarr", config())
    return root


def phases(written: list[str], store: Path) -> dict[str, list[int]]:
    """Write numbers (1-based) by phase: laying out the store, filling chunks, and (in an append run) growing
    the arrays and recording the manifest before the first chunk is filled."""
    first_chunk = next(i for i, key in enumerate(written) if "/features/" in key and "/c/" in key)
    laying = [i + 1 for i, key in enumerate(written[:first_chunk]) if key.startswith(partial_path(store).name)]
    growing = [i + 1 for i in range(first_chunk)] if not laying else []
    return {"create": laying, "append": growing, "extract": list(range(first_chunk + 1, len(written) + 1))}


@pytest.mark.slow
def test_kills_at_random_points_of_creation_extraction_and_append_resume_to_the_uninterrupted_store(
        cohorts, tmp_path):
    rng = random.Random(16)
    expected = {"fresh": store_files(cohorts / "first.zarr"), "append": store_files(cohorts / "both.zarr")}
    code, counted = run_writer("count", cohorts / "first.parquet", tmp_path / "count-fresh.zarr")
    assert code == 0 and counted["code"] == 0, counted
    fresh = phases(counted["written"], tmp_path / "count-fresh.zarr")
    shutil.copytree(cohorts / "first.zarr", tmp_path / "count-append.zarr")
    code, counted = run_writer("count", cohorts / "both.parquet", tmp_path / "count-append.zarr")
    assert code == 0 and counted["code"] == 0, counted
    appended = phases(counted["written"], tmp_path / "count-append.zarr")
    assert len(fresh["create"]) > 20 and len(appended["append"]) > 10 and fresh["extract"] and appended["extract"]
    trials = ([("fresh", "create", n) for n in rng.sample(fresh["create"], 4)]
              + [("fresh", "extract", n) for n in rng.sample(fresh["extract"], 3)]
              + [("append", "append", n) for n in rng.sample(appended["append"], 4)]
              + [("append", "extract", n) for n in rng.sample(appended["extract"], 2)])
    for k, (kind, phase, at) in enumerate(trials):
        store = tmp_path / f"trial{k}.zarr"
        if kind == "append":
            shutil.copytree(cohorts / "first.zarr", store)
        manifest = cohorts / ("first.parquet" if kind == "fresh" else "both.parquet")
        code, _ = run_writer("kill", manifest, store, at)
        assert code == -signal.SIGKILL, f"trial {k} ({phase} write {at}) was not killed"
        if phase == "append":  # killed mid-append: journalled, and readers refuse the store until it is completed
            assert (store / JOURNAL).exists()
            with pytest.raises(StoreError, match="did not finish"):
                FeatureStore.open(store)
        summary = extract(read_manifest(manifest), store, config())
        assert summary.interrupted_writer is not None, f"trial {k}: the killed writer's record was not reported"
        assert not partial_path(store).exists() and not list(store.rglob("*.partial"))
        assert store_files(store) == expected[kind], f"trial {k}: killed at {phase} write {at}"


def _full_disk_from(n: int, persistent: bool):
    """zarr's file writes failing with ENOSPC from the ``n``-th on (only that one, unless ``persistent``)."""
    real, count = zarr_local._put, [0]

    def put(path, value, exclusive=False):
        count[0] += 1
        if count[0] == n or (persistent and count[0] > n):
            raise OSError(28, "No space left on device", str(path))
        return real(path, value, exclusive=exclusive)
    return put


def test_a_full_disk_while_a_store_is_created_or_appended_to_leaves_it_resumable(cohorts, tmp_path, monkeypatch):
    expected = {"fresh": store_files(cohorts / "first.zarr"), "append": store_files(cohorts / "both.zarr")}
    for k, (kind, at, persistent) in enumerate([("fresh", 1, False), ("fresh", 12, True), ("fresh", 40, False),
                                                ("append", 3, False), ("append", 9, True)]):
        store = tmp_path / f"full{k}.zarr"
        if kind == "append":
            shutil.copytree(cohorts / "first.zarr", store)
        manifest = read_manifest(cohorts / ("first.parquet" if kind == "fresh" else "both.parquet"))
        monkeypatch.setattr(zarr_local, "_put", _full_disk_from(at, persistent))
        with pytest.raises(OutputError, match="No space left on device"):
            extract(manifest, store, config())
        monkeypatch.undo()
        if kind == "fresh":
            assert not store.exists() and not partial_path(store).exists()  # nothing half-made left behind
        else:
            assert not (store / JOURNAL).exists()  # rolled back at once
            assert store_files(store) == expected["fresh"]
        extract(manifest, store, config())
        assert store_files(store) == expected[kind], f"full disk {k} at write {at}"


@pytest.mark.slow
def test_two_writers_at_once_leave_one_store_and_a_clear_refusal(cohorts, tmp_path):
    rng = random.Random(7)
    expected = store_files(cohorts / "first.zarr")
    for trial in range(10):
        store = tmp_path / f"race{trial}.zarr"
        results = [store.with_name(f"{store.name}.{w}.json") for w in "ab"]
        procs = [CTX.Process(target=_writer, args=("slow", 0, str(cohorts / "first.parquet"), str(store), str(r)))
                 for r in results]
        for proc in procs:
            proc.start()
            time.sleep(rng.uniform(0, 0.3))
        for proc in procs:
            proc.join(120)
        outcomes = [json.loads(r.read_text()) for r in results]
        codes = sorted(o["code"] for o in outcomes)
        assert codes == [0, 7], [o["output"] for o in outcomes]
        refusal = next(o["output"] for o in outcomes if o["code"] == 7)
        assert "is being written by another process (pid" in refusal and "Traceback" not in refusal
        assert store_files(store) == expected, f"race {trial}"
