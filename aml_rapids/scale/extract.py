"""Extraction over a Dask cluster: the pending chunks cut into units of whole chunks, each extracted and written
by one worker with the single-process loop (``features.extract.fill_chunks``).

The coordinating process (this one) holds the store's lock for the whole job and names the job in it; it
creates or extends the store, clears the done-markers of the chunks to compute again, and hands out the units.
A worker loads the networks once and keeps them for every unit it is given; before each chunk it writes it checks
that the store is still held, and for its job (``check_lease``), so a worker left running by a job that ended
never writes into a store another job has taken; and it skips the unit's chunks already done, so a unit retried
after its worker died computes only what that worker had not written. A unit is never split between workers (zarr
writes a chunk in several files, so two writers of one chunk could leave a mix); when a job stops, its running
units are told to write no further chunk, and on a cluster that outlives the job it waits for them. Units never cross a loader pass, so every chunk is
read in the same batches as by one process, and the store's arrays equal a single-process extraction's.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import CancelledError
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..data.manifest import Manifest
from ..errors import BusyError, ClusterError
from ..features.engines import calibration_cells
from ..features.extract import (Backbones, ExtractSummary, Pending, store_engines, fill_chunks, load_backbones,
                                pending_rows, plan_pending, stored_backbones)
from ..features.lock import StoreLock, check_lease
from ..features.store import FeatureStore, StoreError
from ..logs import log, say
from .cluster import dask_client
from ..loader.loader import resolve_device

GiB = 2**30


@dataclass
class Unit:
    number: int
    chunks: list[int]


@dataclass
class UnitDone:
    """What one worker did with one unit: the chunks it wrote itself (the per-chunk writer record)."""

    number: int
    worker: str
    host: str
    pid: int
    seconds: float
    chunks_written: list[int]
    summary: ExtractSummary


def cut_units(pending: Pending, unit_chunks: int) -> list[Unit]:
    """The pending chunks in units of at most ``unit_chunks`` consecutive chunks, never across a loader pass."""
    units: list[Unit] = []
    for run in pending.passes():
        for i in range(0, len(run), unit_chunks):
            units.append(Unit(len(units), run[i:i + unit_chunks]))
    return units


class _WorkerCache:
    """What a worker process keeps between units: the networks of one configuration (a later job with another
    configuration replaces them, so a long-lived cluster never piles up networks) and the store's rows of one job.
    A lock makes a worker running several units at once (``threads_per_worker`` above 1) load them once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.config: str | None = None
        self.networks: dict[str, tuple[Backbones, str]] = {}  # by the store's engines (None: a new store)
        self.job: tuple[str, str] | None = None
        self.pending: Pending | None = None

    def networks_for(self, cfg: RunConfig, pinned: dict | None, load) -> tuple[Backbones, str]:
        config, engines = _json(cfg.model_dump(mode="json")), _json(pinned)
        with self.lock:
            if config != self.config:
                self.config, self.networks = config, {}
            if engines not in self.networks:
                self.networks[engines] = load()
            return self.networks[engines]

    def alias(self, cfg: RunConfig, pinned: dict, held: tuple[Backbones, str]) -> None:
        """The networks loaded for a new store, kept under the engines that store will then name."""
        with self.lock:
            if _json(cfg.model_dump(mode="json")) == self.config:
                self.networks.setdefault(_json(pinned), held)

    def pending_for(self, store_path: str, job: str) -> Pending:
        with self.lock:
            if self.job != (store_path, job):
                store = FeatureStore.open(Path(store_path), mode="r+", sweep=False)  # others are writing
                self.job, self.pending = (store_path, job), Pending(store, store.rows(), [], ExtractSummary())
            return self.pending


_CACHE = _WorkerCache()


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _worker_config(cfg: RunConfig) -> RunConfig:
    """The config a worker runs with: its own threads for torch and DALI, not every core of its machine."""
    threads = _worker_threads()
    if cfg.loader.num_threads is None:
        cfg = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"num_threads": threads})})
    return cfg


def _worker_threads() -> int:
    from distributed import get_worker

    try:
        return get_worker().state.nthreads
    except ValueError:  # not on a worker (a test calling a task directly)
        return 1


def _networks(cfg: RunConfig, manifest: Manifest, pinned: dict | None) -> tuple[Backbones, str]:
    def load() -> tuple[Backbones, str]:
        import torch

        device = resolve_device(cfg.loader.device)
        if device == "cpu":
            torch.set_num_threads(_worker_threads())
        return load_backbones(cfg, "cuda" if device == "gpu" else "cpu",
                              lambda norms: calibration_cells(manifest, cfg, norms), pinned), device

    return _CACHE.networks_for(cfg, pinned, load)


def describe_backbones(manifest: Manifest, cfg: RunConfig, pinned: dict | None, store_path: str, job: str) -> dict:
    """(On a worker.) The networks' identity as this worker loads them, and the memory its process then holds:
    what the coordinator creates the store with and sizes the units by. First, that this worker sees the job's
    lock on the store, as every unit will check it."""
    import psutil

    try:
        check_lease(Path(store_path), job)
    except BusyError as exc:
        raise ClusterError(f"a worker cannot see this job's lock on {store_path} ({exc}): the file system's locks "
                           "are local to each node (Lustre's localflock, say); put the store where file locks are "
                           "shared between nodes (flock), or extract on one node (scale.cluster=local-cuda)") from None

    cfg = _worker_config(cfg)
    held = backbones, device = _networks(cfg, manifest, pinned)
    _CACHE.alias(cfg, backbones.info, held)  # as its units will ask for them, once the store names its engines
    return {"info": backbones.info, "seen": backbones.seen, "checks": backbones.checks, "device": device,
            "normalizations": len(backbones.normalizations), "rss": psutil.Process().memory_info().rss}


def extract_unit(manifest: Manifest, store_path: str, cfg: RunConfig, job: str, unit: Unit) -> UnitDone:
    """(On a worker.) Compute and write the unit's chunks that are not done yet, the store's lease checked first."""
    from distributed import Event, get_client, get_worker

    start = time.perf_counter()
    check_lease(Path(store_path), job)
    cfg = _worker_config(cfg)
    shared = _CACHE.pending_for(store_path, job)
    backbones, _ = _networks(cfg, manifest, stored_backbones(shared.store.meta))
    todo = [k for k, done in zip(unit.chunks, shared.store.done_chunks(unit.chunks)) if not done]
    summary = ExtractSummary()
    stop = Event(f"aml-rapids-stop-{job}", client=get_client())  # asked from the writer threads

    def guard() -> None:  # before every chunk: the job may have stopped, or ended and another taken the store
        if stop.is_set():
            raise BusyError(f"Dask job {job} stopped; this worker's unit of {store_path} is dropped")
        check_lease(Path(store_path), job)

    fill_chunks(manifest, shared, shared.passes(todo), cfg, backbones, summary, guard=guard)
    summary.seconds = time.perf_counter() - start
    return UnitDone(unit.number, get_worker().address, platform.node(), os.getpid(), summary.seconds,
                    summary.chunks_written, summary)


def unit_memory(cfg: RunConfig, dims: dict[str, int], normalizations: int) -> int:
    """Bytes a unit needs on a worker beside its networks: the chunks in flight (two filling, and the writers'
    queue of ``2 x writers``) and the loader's batches (prefetched, each normalisation as float32)."""
    itemsize = 2 if cfg.features.store_dtype == "float16" else 4
    chunks = (2 + 2 * cfg.features.writers) * cfg.chunk_rows * sum(dims.values()) * (4 + itemsize)
    batches = (cfg.loader.prefetch + 1) * cfg.loader.batch_size * 3 * cfg.loader.image_size**2 * 4 * normalizations
    return chunks + batches


def _check_memory(client, cfg: RunConfig, described: dict) -> None:
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info(n_workers=-1)["workers"].values()]
    if not limits or min(limits) == 0:
        return  # no limit set: nothing to check against
    need = described["rss"] + unit_memory(cfg, {n: b["dim"] for n, b in described["info"].items()},
                                          described["normalizations"])
    if need > min(limits):
        raise ClusterError(f"a unit of extraction needs about {need / GiB:.1f} GiB on a worker (its process with the "
                           f"networks loaded held {described['rss'] / GiB:.1f} GiB), and the smallest worker may use "
                           f"{min(limits) / GiB:.1f} GiB: raise scale.memory_per_worker, or lower "
                           "features.chunk_batches or loader.batch_size")


def extract_sharded(client, manifest: Manifest, store_path: Path, cfg: RunConfig,
                    progress: Callable[[int], None] | None = None,
                    on_total: Callable[[int], None] | None = None) -> ExtractSummary:
    """Fill every pending chunk of the store on a Dask cluster's workers; the same store as ``features.extract``.
    ``client``: a connected client, or None to connect to (or start) the cluster of ``cfg.scale`` once the
    store's lock is held (so a busy store is refused before a cluster is started for it)."""
    store_path = Path(store_path)
    if store_path.is_file():
        raise StoreError(f"{store_path} is a file, not a feature store (a store is a folder)")
    job = f"dask-{secrets.token_hex(6)}"
    start = time.perf_counter()
    # Units still running when the job stops are waited for on a cluster this process does not shut down
    drain = cfg.scale.cluster == "scheduler-file"  # (a local or SLURM cluster it started is closed, workers and all)
    with StoreLock(store_path, job=job) as lock:
        with nullcontext(client) if client is not None else dask_client(cfg.scale) as connected:
            summary = _run_units(connected, manifest, store_path, cfg, job, progress, on_total, drain)
    summary.interrupted_writer = lock.interrupted
    summary.seconds = time.perf_counter() - start
    return summary


def _run_units(client, manifest: Manifest, store_path: Path, cfg: RunConfig, job: str,
               progress: Callable[[int], None] | None, on_total: Callable[[int], None] | None,
               drain: bool) -> ExtractSummary:
    """The coordinator's part, under the store's lock: the networks' identity from a worker, the store created or
    extended, the units handed out and their results gathered."""
    from distributed.scheduler import KilledWorker

    futures = []
    try:
        pinned = store_engines(store_path) if store_path.is_dir() else None
        # A task's result, not scattered data: the scheduler recomputes it when the workers holding it die.
        manifest_on_workers = client.submit(_same, manifest, key=f"aml-rapids-manifest-{job}")
        futures.append(manifest_on_workers)
        _gathered(client, [manifest_on_workers])  # workers that die receiving it: exit 13, before anything else
        networks = client.submit(describe_backbones, manifest_on_workers, cfg, pinned, str(store_path), job,
                                 pure=False, key=f"aml-rapids-networks-{job}")
        futures.append(networks)
        [described] = _gathered(client, [networks])
        _check_memory(client, cfg, described)
        coordinator = Backbones({}, {}, {}, described["info"], seen=described["seen"], checks=described["checks"])
        pending = plan_pending(manifest, store_path, cfg, coordinator, described["device"])
        marked = pending.store.done_chunks()
        pending.store.mark_pending([k for k in pending.chunks if marked[k]])
        if on_total:
            on_total(pending_rows(pending))
        units = cut_units(pending, cfg.scale.unit_chunks)
        say(f"{len(pending.chunks):,} of {pending.store.n_chunks:,} chunks to compute, in {len(units):,} unit(s) of "
            f"at most {cfg.scale.unit_chunks} chunk(s) ({pending.store.chunk_rows:,} rows each), on "
            f"{len(client.scheduler_info(n_workers=-1)['workers'])} worker(s)")
        summary = pending.summary
        unit_futures = [client.submit(extract_unit, manifest_on_workers, str(store_path), cfg, job, unit,
                                      pure=False, key=f"aml-rapids-unit-{job}-{unit.number}") for unit in units]
        futures += unit_futures

        def landed(done: UnitDone) -> None:
            _merge(summary, done, units[done.number])
            if progress:
                progress(pending_rows(pending, units[done.number].chunks))

        _gathered(client, unit_futures, landed)
    except KilledWorker as exc:
        what = next((words for part, words in TASK_WORDS.items() if part in str(exc.task)), "running a task")
        limits = [w.get("memory_limit") or 0 for w in client.scheduler_info(n_workers=-1)["workers"].values()]
        room = f", with {min(limits) / GiB:.2f} GiB each (scale.memory_per_worker)" if limits and min(limits) else ""
        raise ClusterError(f"the workers {what} ({exc.task}) died too often to try again (out of memory{room}? each "
                           "worker's log says); the store keeps every finished chunk: rerun to resume") from None
    except CancelledError:
        raise ClusterError("the Dask cluster cancelled this extraction's work (a worker or the scheduler went "
                           "away); the store keeps every finished chunk: rerun to resume") from None
    finally:
        _stop(client, job, futures, drain)
    return summary


DRAIN_S = 120.0  # how long a stopping job waits for its units still running on a cluster it does not close


def _stop(client, job: str, futures: list, drain: bool) -> None:
    """Stop the job's work: the stop event tells running units to write no further chunk, queued ones are
    cancelled, and on a cluster that outlives this process (``drain``) the coordinator waits, bounded, for the
    running units to end before the store's lock is released, so no unit of this job writes while another job
    holds the store."""
    from distributed import Event

    try:
        Event(f"aml-rapids-stop-{job}", client=client).set()
        client.cancel(futures)
        keys = {f.key for f in futures}
        deadline = time.monotonic() + (DRAIN_S if drain else 0)
        while drain and time.monotonic() < deadline:
            if not keys & {k for running in client.processing().values() for k in running}:
                return
            time.sleep(0.5)
        if drain:
            log.warning(f"units of Dask job {job} still run after {DRAIN_S:g} s; each checks the store's lock before "
                        "its next chunk")
    except Exception as exc:  # the cluster may be gone already; stopping must not hide why the job stopped
        log.debug(f"stopping Dask job {job}: {type(exc).__name__}: {exc}")


TASK_WORDS = {"manifest": "receiving the manifest", "networks": "loading the networks",
              "unit": "extracting a unit"}  # a task's key part -> what its workers were doing
POLL_S = 2.0  # how often a coordinator waiting on its workers looks for paused ones


def _gathered(client, futures: list, each: Callable | None = None) -> list:
    """The futures' results in order (``each`` called with each as it lands). A worker that Dask pauses, its
    memory near its limit, would never finish and never fail: that is refused, naming the worker's limit."""
    from distributed import wait

    left, results, paused = set(futures), {}, Counter()
    while left:
        try:
            finished, left = wait(left, timeout=POLL_S, return_when="FIRST_COMPLETED")
        except (TimeoutError, asyncio.TimeoutError):  # two classes before Python 3.11
            finished = set()
        for future in finished:
            results[future.key] = future.result()
            if each:
                each(results[future.key])
        _refuse_paused(client, paused)
    return [results[f.key] for f in futures]


PAUSED_POLLS = 3  # a worker paused this many polls running (a pause while it spills to disk passes sooner)


def _refuse_paused(client, seen: Counter) -> None:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    for address, worker in workers.items():
        seen[address] = seen[address] + 1 if worker.get("status") == "paused" else 0
    stuck = [address for address, count in seen.items() if count >= PAUSED_POLLS and address in workers]
    if stuck:
        address, worker = stuck[0], workers[stuck[0]]
        limit = (worker.get("memory_limit") or 0) / GiB
        raise ClusterError(f"Dask paused worker {address}: its memory is near its limit of {limit:.2f} GiB, too "
                           "little for the networks and a unit of extraction; raise scale.memory_per_worker, or "
                           "lower features.chunk_batches or loader.batch_size; the store keeps every finished "
                           "chunk")


def _same(value):
    return value


def _merge(summary: ExtractSummary, done: UnitDone, unit: Unit) -> None:
    part = done.summary
    summary.rows_written += part.rows_written
    summary.rows_failed += part.rows_failed
    summary.failures += part.failures
    summary.chunks_written += part.chunks_written
    for name, seconds in part.seconds_in.items():
        summary.seconds_in[name] += seconds  # summed over workers: they overlap in time
    summary.units.append({"unit": done.number, "chunks": unit.chunks, "written": done.chunks_written,
                          "worker": done.worker, "host": done.host, "pid": done.pid,
                          "seconds": round(done.seconds, 3), "rows": part.rows_written + part.rows_failed})
    log.debug(f"unit {done.number}: chunks {done.chunks_written} by {done.worker} in {done.seconds:.1f} s")
