"""Extraction on a Dask cluster against the single-process path, the same cells and networks in one run.

Variants: this process (today's path, every usable core, networks loaded once outside the timing), and a
``local`` cluster of 1 and of 2 worker processes (``--threads`` threads each; on a GPU machine ``local-cuda``, one
worker per GPU). The clusters are started before the timing (``cluster_start_seconds``), and each variant's
warm-up extracts ``WARMUP`` cells, so every worker holds its networks when the timed runs begin, as in a long
job. Each timed run is a whole extraction into a fresh store, the coordinator's work included.

Where the time of a Dask run goes (``breakdown``, from Dask's task stream of the last timed run): ``setup``, the
coordinator before the first unit starts (the store's creation, the networks' identity asked of a worker);
``busiest worker``, the compute of the worker with the most unit time; and the rest of the wall time,
``scheduling + transfers`` (assigning units, sending results, the idle end of the less busy workers). The units'
own time is split as the single-process loop splits it (``worker_time_in``: loader, networks, writes).
``scheduler_overhead_per_task_ms`` is the round trip of an empty task on the same cluster.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from aml_rapids.config import RunConfig, ScaleConfig, load_config
from aml_rapids.data.manifest import Manifest
from aml_rapids.features.engines import calibration_cells
from aml_rapids.features.extract import ExtractSummary, extract, load_backbones
from aml_rapids.scale.cluster import dask_client

from .extract_parts import bench_config
from .harness import Variant, head, throughputs

WARMUP = 256  # cells of each variant's warm-up: enough for every worker to load its networks once
EMPTY_TASKS = 200


def _noop(i: int) -> int:
    return i


def scheduler_overhead_ms(client) -> float:
    """Milliseconds per empty task, submitted and gathered in one batch (the scheduler's and the comms' share)."""
    start = time.perf_counter()
    client.gather(client.map(_noop, range(EMPTY_TASKS), pure=False))
    return 1000 * (time.perf_counter() - start) / EMPTY_TASKS


class DaskExtract:
    """One extraction on ``client`` into a fresh store, with the task stream of every run kept."""

    def __init__(self, client, cfg: RunConfig):
        self.client, self.cfg = client, cfg
        self.summaries: list[ExtractSummary] = []
        self.streams: list[list[dict]] = []
        self.walls: list[tuple[float, float]] = []

    def __call__(self, manifest: Manifest) -> int:
        from distributed import get_task_stream

        from aml_rapids.scale.extract import extract_sharded

        store = Path(tempfile.mkdtemp()) / "bench.zarr"
        try:
            with get_task_stream(self.client) as stream:
                start = time.time()
                self.summaries.append(extract_sharded(self.client, manifest, store, self.cfg))
                self.walls.append((start, time.time()))
            self.streams.append(stream.data)
        finally:
            shutil.rmtree(store.parent, ignore_errors=True)
        return self.summaries[-1].rows_written


def breakdown(run: DaskExtract) -> dict:
    """The last timed run's wall time taken apart (seconds), from its task stream."""
    start, end = run.walls[-1]
    units = [t for t in run.streams[-1] if "aml-rapids-unit" in str(t["key"])]
    compute = {}
    for task in units:
        for step in task["startstops"]:
            if step["action"] == "compute":
                compute.setdefault(task["worker"], []).append((step["start"], step["stop"]))
    busy = {worker: sum(b - a for a, b in spans) for worker, spans in compute.items()}
    first = min(a for spans in compute.values() for a, _ in spans)
    setup = first - start
    busiest = max(busy.values())
    transfers = sum(step["stop"] - step["start"] for t in run.streams[-1] for step in t["startstops"]
                    if step["action"] in ("transfer", "deserialize"))
    return {"wall": end - start, "setup": setup, "busiest worker": busiest,
            "scheduling + transfers": end - start - setup - busiest,
            "workers_busy": {w: round(s, 3) for w, s in busy.items()}, "units": len(units),
            "transfer + deserialize (summed)": transfers}


def run(manifest: Manifest, device: str, repeats: int, batch_size: int, backbones: list[str],
        weights: dict[str, str], threads: int) -> list[dict]:
    where = "cuda" if device == "gpu" else "cpu"
    cfg = bench_config(backbones, device, batch_size, weights=weights)
    kind = "local-cuda" if device == "gpu" else "local"
    clusters, rows_extra = {}, {}
    variants: dict[str, Variant] = {}
    prepared = load_backbones(cfg, where, lambda norms: calibration_cells(manifest, cfg, norms))
    baseline = "this process (single-process path)"

    def in_process(cells: Manifest) -> int:
        store = Path(tempfile.mkdtemp()) / "bench.zarr"
        try:
            return extract(cells, store, cfg, backbones=prepared).rows_written
        finally:
            shutil.rmtree(store.parent, ignore_errors=True)

    variants[baseline] = Variant(lambda: in_process(manifest), lambda: in_process(head(manifest, WARMUP)))
    runs: dict[str, DaskExtract] = {}
    with _clusters(kind, threads) as started:
        for workers, (client, seconds) in started.items():
            name = f"Dask {kind}, {workers} worker(s) x {threads} thread(s)"
            on_cluster = load_config(None, [f"scale.cluster={kind}", f"scale.workers={workers}",
                                            f"scale.threads_per_worker={threads}"],
                                     base=cfg.model_dump(mode="json"))
            runs[name] = job = DaskExtract(client, on_cluster)
            variants[name] = Variant(lambda j=job: j(manifest), lambda j=job: j(head(manifest, WARMUP)))
            clusters[name] = client
            rows_extra[name] = {"workers": workers, "threads_per_worker": threads, "cluster_start_seconds": seconds}
        timings = throughputs(variants, repeats)
        for name, client in clusters.items():
            rows_extra[name]["scheduler_overhead_per_task_ms"] = scheduler_overhead_ms(client)
    rows = [{"variant": name, **timing} for name, timing in timings.items()]
    base = rows[0]["items_per_s"]
    one = next((r for r in rows if rows_extra.get(r["variant"], {}).get("workers") == 1), None)
    for row in rows:
        row["x_single_process"] = row["items_per_s"] / base
        if row["variant"] in runs:
            job = runs[row["variant"]]
            row.update(rows_extra[row["variant"]], breakdown=breakdown(job),
                       worker_time_in=job.summaries[-1].seconds_in)
            if one is not None:
                row["scaling_efficiency"] = row["items_per_s"] / (row["workers"] * one["items_per_s"])
    return rows


@contextmanager
def _clusters(kind: str, threads: int) -> Iterator[dict[int, tuple[object, float]]]:
    """A cluster of 1 worker and one of 2 (on a GPU machine, of as many as there are GPUs, at most 2), all
    started before any timing (idle workers cost nothing), with the seconds each took to start."""
    from aml_rapids.scale.cluster import visible_gpus

    started = {}
    with ExitStack() as stack:
        for workers in (1, 2) if kind == "local" else range(1, min(2, visible_gpus()) + 1):
            start = time.perf_counter()
            client = stack.enter_context(dask_client(ScaleConfig(cluster=kind, workers=workers,
                                                                 threads_per_worker=threads)))
            started[workers] = (client, time.perf_counter() - start)
        yield started
