"""The extraction loop: loader batches through every configured backbone, whole chunks into the store.

Start, resume and append are one operation, under the store's lock: the store is created from the plan if
absent, extended by the plan's rows whose content (sha256 + augmentation index) it lacks, and then every chunk
not marked done, or holding rows that failed before (their files may be back), is computed. Each backbone runs
on its engine (``engines/``: PyTorch, OpenVINO, ONNX Runtime or TensorRT, checked against PyTorch fp32 on
calibration cells first); an engine of one batch shape gets every batch padded to it, so nothing recompiles
mid-run. On a GPU features come back to the host asynchronously, one batch behind, and finished chunks are
written on background threads, so neither the copy nor the write stalls the device.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import RunConfig
from ..data.manifest import Manifest, same_content
from ..errors import ConfigError, DataError
from ..data.scan import Problem
from ..loader.augment import DRAWS, augment_identity
from ..loader.loader import CellLoader, resolve_device, stain_target
from ..loader.pipeline import Normalization
from ..logs import log
from ..provenance import machine_info, software_versions, usable_cores
from ..timing import span
from .backbones import get_spec
from .engines import Calibration, Choice, Runner, Target, calibration_cells, needs_calibration, prepare
from .engines.base import padded
from .plan import STATUS_FAILED, STATUS_OK, STATUS_PADDING, pad_segments, plan_rows
from .lock import StoreLock
from .store import FeatureStore, StoreError, StoreMismatch, identity_differences
from .weights import load_backbone
from .writer import ChunkWriter

# Where an extraction's wall time goes, as the host sees it: setting up each loader pass (its rows, the loader
# object), the loader's start (to its first batch: file checks, pipeline build), waiting for its later batches,
# launching the networks (all of their compute on a CPU; on a GPU, queueing), waiting for the device to finish a
# batch, converting and handing features to the writer (blocks while its queue is full), the last writes at the end.
TIME_PARTS = ("pass setup", "loader start", "loader wait", "launch", "device wait", "host + hand-off",
              "final writes")


@dataclass
class ExtractSummary:
    rows_written: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    rows_appended: int = 0
    rows_retried: int = 0  # rows that had failed in an earlier run, tried again
    chunks_lost: int = 0  # chunks marked done whose files were gone, computed again
    chunks_written: list[int] = field(default_factory=list)  # by this process, in the order handed to the writer
    interrupted_writer: str | None = None  # an earlier writer that ended without releasing the lock
    seconds: float = 0.0
    failures: list[Problem] = field(default_factory=list)
    units: list[dict] = field(default_factory=list)  # a Dask run's units: chunks, the chunks each worker wrote, time
    seconds_in: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIME_PARTS, 0.0))

    @property
    def images_per_s(self) -> float:
        return (self.rows_written + self.rows_failed) / self.seconds if self.seconds else 0.0

    @property
    def seconds_after_start(self) -> float:
        """The loop once the loader's first batch is in hand: the steady part, its start-up (each pass's setup
        and the loader's start) left out."""
        return self.seconds - self.seconds_in["pass setup"] - self.seconds_in["loader start"]

    @property
    def after_start_per_s(self) -> float:
        running = self.seconds_after_start
        return (self.rows_written + self.rows_failed) / running if running > 0 else 0.0


@dataclass
class Backbones:
    """The networks, each on its engine, the loader normalisation each one reads, and their provenance."""

    nets: dict[str, Runner]
    norm_of: dict[str, str]
    normalizations: dict[str, Normalization]
    info: dict[str, dict]
    batch_size: int | None = None  # fixed-shape engines (compiled, TensorRT): every batch is padded to this size
    seen: frozenset[str] = frozenset()  # SHA-256 of the cells a fine-tuned backbone trained or validated on
    checks: dict[str, dict] = field(default_factory=dict)  # each engine's parity (and auto's speeds) measured here


Calibrate = Callable[[dict[str, Normalization]], Calibration]


def load_backbones(cfg: RunConfig, device: str, calibrate: Calibrate | None = None,
                   pinned: dict[str, dict] | None = None) -> Backbones:
    """The configured networks, each on its engine, ready for inference on ``device`` ("cuda" or "cpu"). Load
    them once and pass them to every ``extract`` of a process (shards, cohorts, benchmark repeats) to build and
    compile them once. ``calibrate(normalizations)``: the calibration cells, needed by any engine but PyTorch
    fp32; ``pinned``: an existing store's backbones (``stored_backbones``), whose engines an extension runs."""
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: autotuned convolutions pay off at once
    loaded, norm_of, norms, info, seen = {}, {}, {}, {}, frozenset()
    for item in cfg.features.backbones:
        spec = get_spec(item.name)
        spec.check_input(cfg.loader.image_size)
        net, weights = load_backbone(item.name, item.weights, cfg.features.seed)
        loaded[item.name] = net.to(device), weights
        key = next((k for k, v in norms.items() if v == spec.normalization), item.name)
        norms[key] = spec.normalization
        norm_of[item.name] = key
        info[item.name] = {"dim": spec.dim, "layer": spec.layer, "weights": weights.source,
                           "sha256": weights.sha256, "pretrained": weights.pretrained}
        if weights.finetuned is not None:
            info[item.name]["finetuned"] = weights.finetuned.provenance()
            seen |= weights.finetuned.seen
    pinned = pinned or {}
    wanted = {item.name: _wanted(item.name, Choice(item.engine or cfg.features.engine, item.precision or
                                                   cfg.features.precision), pinned.get(item.name))
              for item in cfg.features.backbones}
    calibration = None
    if any(needs_calibration(c.engine, c.precision) for c in wanted.values()):
        if calibrate is None:
            raise ConfigError("engines other than torch fp32 are checked on calibration cells, and none were given")
        calibration = calibrate(norms)
    nets, checks = {}, {}
    for name, (net, weights) in loaded.items():
        checked = cells = calibration and calibration.images[norm_of[name]]
        digest = calibration and calibration.digest
        made_of = pinned.get(name, {}).get("calibration")  # an int8 store's network: the one made of its cells
        if wanted[name].precision == "int8" and made_of not in (None, digest):
            digest, cells = made_of, None  # from the engine cache, or a clear refusal; never recalibrated
        target = Target(name, net, weights.sha256 or f"none (seed {cfg.features.seed})", cfg.loader.image_size,
                        device, cfg.loader.batch_size,
                        checked if checked is None else checked[:cfg.features.calibration_cells],
                        digest, cells, cfg.features.channels_last, cfg.features.compile,
                        cfg.features.compile_mode, dict(cfg.features.min_cosine))
        nets[name] = runner = prepare(target, wanted[name].engine, wanted[name].precision)
        info[name].update(engine=runner.choice.engine, precision=runner.choice.precision)
        if runner.choice.precision == "int8":
            info[name]["calibration"] = digest  # an int8 network is made of its calibration cells
        checks[name] = {"engine": str(runner.choice), **runner.measured}
    fixed = {r.batch_size for r in nets.values()} - {None}
    return Backbones(nets, norm_of, norms, info, fixed.pop() if fixed else None, seen, checks)


def _wanted(name: str, asked: Choice, stored: dict | None) -> Choice:
    """The engine a backbone runs on: the store's where it has one (the config may leave either half to
    ``auto``), so an extension matches what the store holds; a store of another engine is refused before any
    engine is built."""
    if stored is None:
        return asked
    made = Choice(stored["engine"], stored["precision"])
    if asked.engine in ("auto", made.engine) and asked.precision in ("auto", made.precision):
        return made
    key = "engine" if asked.engine not in ("auto", made.engine) else "precision"
    raise StoreMismatch(f"the store's {name} features were computed on {made}, and the config asks for "
                        f"{asked.engine} {asked.precision} (differs in backbones.{name}.{key}); extract into a new "
                        "store (-o), or leave features.engine and features.precision at auto to extend it")


def preprocess_identity(cfg: RunConfig) -> dict:
    """The preprocessing that decides a row's pixels, as stores and fine-tuning checkpoints record it. Colour and
    stain jitter and stain normalisation appear only when on, so those made before they existed keep theirs; the
    normalisation's reference is named by content (its statistics follow from it, and are recomputed on every
    machine to the last bit or not)."""
    preprocess = {"image_size": cfg.loader.image_size, "segmentation": cfg.segmentation.model_dump(),
                  "augment": augment_identity(cfg.augment), "oversample": cfg.oversample.model_dump(),
                  "augment_seed": cfg.loader.seed, "augment_draws": DRAWS}
    target = stain_target(cfg)
    if target is not None:
        preprocess["stain_norm"] = {"method": cfg.stain_norm.method, "region": target.region,
                                    "sha256": target.sha256}
    return preprocess


def store_identity(cfg: RunConfig, backbones: Backbones) -> dict:
    """What makes two runs' features comparable; a store only accepts rows computed the same way."""
    return {"backbones": backbones.info, "chunk_rows": cfg.chunk_rows, "store_dtype": cfg.features.store_dtype,
            "features_seed": cfg.features.seed, "preprocess": preprocess_identity(cfg)}


def stored_backbones(meta: dict) -> dict[str, dict]:
    """A store's backbones with the engine and precision each ran on; a store made before engines were a choice
    ran PyTorch, in the precision its config and device gave (bf16 on a GPU, fp32 on a CPU, unless set)."""
    asked = (meta.get("config") or {}).get("features", {}).get("precision", "auto")
    legacy = {"engine": "torch", "precision": asked if asked != "auto" else
              ("bf16" if meta.get("device") == "gpu" else "fp32")}
    return {name: {**legacy, **info} for name, info in (meta.get("backbones") or {}).items()}


def store_engines(store_path: Path) -> dict[str, dict]:
    """An existing store's backbones with their engines (none for a new store): an extension of it runs them
    again, whatever ``auto`` would choose today."""
    try:
        return stored_backbones(FeatureStore.open(store_path).meta)
    except (StoreError, DataError, OSError):
        return {}


def _check_identity(store: FeatureStore, identity: dict) -> None:
    have = {key: store.meta.get(key) for key in identity}
    have["backbones"] = stored_backbones(store.meta)
    differs = identity_differences(have, identity)
    if differs:
        raise StoreMismatch(f"store {store.path} was made with another configuration (differs in "
                            f"{', '.join(differs)}); extract into a new store (-o), or use the config it was made "
                            "with, or delete the store if it holds nothing you need")


ROW_METADATA = ("split", "fold", "label", "patient")  # what a manifest says of a cell that the store keeps


def _check_rows_agree(store: FeatureStore, have: pd.DataFrame, rows: pd.DataFrame) -> None:
    """A store keeps the split it was extracted with (its training rows are oversampled and augmented for it),
    and the labels and patients of its cells: a manifest that says otherwise of any cell it holds (another part
    or fold, a relabelled class) is refused, not silently ignored."""
    stored = have.loc[have["status"] != STATUS_PADDING, ["cell_id", *ROW_METADATA]].drop_duplicates("cell_id")
    asked = rows[["cell_id", *ROW_METADATA]].drop_duplicates("cell_id")
    both = stored.merge(asked, on="cell_id", suffixes=("_store", "_manifest")).set_index("cell_id")
    for column in ROW_METADATA:
        moved = both[both[f"{column}_store"].astype(str) != both[f"{column}_manifest"].astype(str)]
        if not len(moved):
            continue
        cell, row = moved.index[0], moved.iloc[0]
        was = (store.meta.get("manifests") or [{}])[0].get("split") or "no split"
        raise StoreMismatch(
            f"this manifest gives {len(moved):,} of the cells in store {store.path} another {column} than the "
            f"store holds (e.g. cell {cell}: store {row[f'{column}_store']!r}, manifest "
            f"{row[f'{column}_manifest']!r}); the store was extracted with split {was}. A store keeps what it "
            "was extracted with: extract into a new store")


def open_or_extend(path: Path, manifest: Manifest, cfg: RunConfig, identity: dict, device: str,
                   seen: frozenset[str] = frozenset(), checks: dict | None = None) -> tuple[FeatureStore, int]:
    """The store for this manifest: created, or checked and extended by the rows it lacks; rows of cells in
    ``seen`` (a fine-tuned backbone's) are marked so; ``checks``, the engines' parity measured for these
    rows, go into the manifest's record. The caller holds the store's lock."""
    rows = plan_rows(manifest.table, cfg)
    rows["finetune_seen"] = same_content(rows, seen)
    record = {"digest": manifest.digest(), "source": manifest.meta.get("source", str(manifest.root)),
              "root": str(manifest.root), "cohorts": sorted(map(str, manifest.table["cohort"].unique())),
              "split": manifest.meta.get("split"), "engines": checks or {},
              "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        if path.is_dir():
            path.rmdir()  # an empty folder made for it
        meta = {**identity, "manifests": [{**record, "rows": len(rows)}], "versions": software_versions(),
                "device": device, "machine": machine_info(), "config": cfg.model_dump(mode="json")}
        return FeatureStore.create(path, pad_segments(rows, cfg.chunk_rows),
                                   {n: b["dim"] for n, b in identity["backbones"].items()}, meta), len(rows)
    store = FeatureStore.open(path, mode="r+")
    _check_identity(store, identity)
    stored = store.rows()
    _check_rows_agree(store, stored, rows)
    have = set(zip(stored["sha256"], stored["aug_index"]))
    new = rows[[key not in have for key in zip(rows["sha256"], rows["aug_index"])]]
    if len(new):
        store.append(pad_segments(new, cfg.chunk_rows), {**record, "rows": len(new)})
    return store, len(new)


class _ChunkBuffer:
    """Features of one chunk gathered batch by batch; complete when every non-padding row has arrived. Made when
    its first row arrives and every row written once (NaN for padding and failed rows), so host memory holds the
    chunks in flight rather than a whole pass filled in advance."""

    def __init__(self, status: np.ndarray, dims: dict[str, int], dtype: str):
        padding = status == STATUS_PADDING
        self.features = {n: np.empty((len(status), d), dtype) for n, d in dims.items()}
        for values in self.features.values():
            values[padding] = np.nan
        self.status = status.copy()
        self.expected = int((~padding).sum())
        self.arrived = 0

    def put(self, offsets: np.ndarray, feats: dict[str, np.ndarray] | None) -> None:
        for name, values in self.features.items():
            values[offsets] = np.nan if feats is None else feats[name]
        self.status[offsets] = STATUS_OK if feats is not None else STATUS_FAILED
        self.arrived += len(offsets)

    @property
    def complete(self) -> bool:
        return self.arrived == self.expected


FLOAT16_NORMAL = (2.0**-14, 65504.0)


def storable(values: np.ndarray, backbone: str, dtype: str) -> np.ndarray:
    """Cast to the store's dtype, refusing float16 when it would flush the features to zero or infinity."""
    if dtype == "float16":
        peak = float(np.abs(values).max()) if values.size else 0.0
        if peak > FLOAT16_NORMAL[1] or 0.0 < peak < FLOAT16_NORMAL[0]:
            raise ConfigError(f"features of {backbone} reach |x| = {peak:.3g}, outside float16's normal range "
                              f"({FLOAT16_NORMAL[0]:.1e} to {FLOAT16_NORMAL[1]:.0f}); extract into a new store (-o, or delete "
                              "this one) with --set features.store_dtype=float32")
    return values.astype(dtype)


def loader_passes(chunks: list[int], augment_of_chunk: np.ndarray, padded_chunk: np.ndarray) -> list[list[int]]:
    """Consecutive pending chunks with the same augmentation flag: one loader pass each. A pass also ends after
    a chunk that holds padding (a segment's last), so every chunk's batches start at the chunk's first row: a
    resumed run, or a worker given any whole chunks, sees the same batches as one uninterrupted pass."""
    runs: list[list[int]] = []
    for k in chunks:
        last = runs[-1][-1] if runs else None
        if last == k - 1 and augment_of_chunk[last] == augment_of_chunk[k] and not padded_chunk[last]:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


@dataclass
class _InFlight:
    """One batch's features on their way to the host. On a GPU the copies are asynchronous (into pinned memory)
    and the host reads them one batch later, after their event, so it never waits on the device while the next
    batch could already be queued; on a CPU everything is already there."""

    positions: np.ndarray
    host: dict[str, torch.Tensor]
    done: torch.cuda.Event | None

    @classmethod
    def launch(cls, batch, backbones: Backbones) -> "_InFlight":
        rows = len(batch.positions)
        laid_out: dict[tuple[str, bool], torch.Tensor] = {}  # each normalisation in each layout, once

        def images_for(name: str) -> torch.Tensor:
            key = (backbones.norm_of[name], backbones.nets[name].channels_last)
            if key not in laid_out:
                layout = torch.channels_last if key[1] else torch.contiguous_format
                laid_out[key] = padded(batch.images[key[0]], backbones.batch_size).contiguous(memory_format=layout)
            return laid_out[key]

        host = {name: runner(images_for(name))[:rows].float().to("cpu", non_blocking=True)
                for name, runner in backbones.nets.items()}
        done = None
        if next(iter(batch.images.values())).is_cuda:
            done = torch.cuda.Event()
            done.record()
        return cls(batch.positions, host, done)

    def wait(self) -> dict[str, torch.Tensor]:
        if self.done is not None:
            self.done.synchronize()
        return self.host


def _timed_batches(loader, totals: dict[str, float]):
    """The loader's batches, the time spent waiting for each added to ``totals`` (the first: its start)."""
    batches, part = iter(loader), "loader start"
    while True:
        with span(totals, part):
            batch = next(batches, None)
        if batch is None:
            return
        part = "loader wait"
        yield batch


def _pass_table(manifest: Manifest, index: dict[str, int], real: pd.DataFrame, store_path: Path) -> pd.DataFrame:
    """The manifest rows of one loader pass, in store order, with their augmentation index."""
    unknown = [c for c in real["cell_id"] if c not in index]
    if unknown:
        raise StoreError(f"store {store_path} still has rows to compute for {len(unknown)} cells that this "
                         f"manifest does not list (e.g. {unknown[0]}); resume with the manifest they came from")
    return manifest.table.iloc[[index[c] for c in real["cell_id"]]].assign(
        aug_index=real["aug_index"].to_numpy()).reset_index(drop=True)


def extract(manifest: Manifest, store_path: Path, cfg: RunConfig,
            progress: Callable[[int], None] | None = None,
            on_total: Callable[[int], None] | None = None,
            backbones: Backbones | None = None) -> ExtractSummary:
    """Fill every chunk of the store that is not done; returns counts and failures. ``backbones``: networks
    already loaded by ``load_backbones`` with this ``cfg`` (default: loaded here, once the store's location
    is checked and its lock held). With ``scale.cluster`` set (and no networks given), the chunks are filled by
    the workers of that Dask cluster instead (``scale.extract``), into the same store."""
    if cfg.scale.cluster != "none" and backbones is None:
        from ..scale.extract import extract_sharded

        return extract_sharded(None, manifest, store_path, cfg, progress, on_total)
    device = resolve_device(cfg.loader.device)
    if device == "cpu":
        torch.set_num_threads(usable_cores())
    if Path(store_path).is_file():
        raise StoreError(f"{store_path} is a file, not a feature store (a store is a folder)")
    with StoreLock(store_path) as lock:
        backbones = backbones or load_backbones(
            cfg, "cuda" if device == "gpu" else "cpu", lambda norms: calibration_cells(manifest, cfg, norms),
            store_engines(Path(store_path)) if Path(store_path).is_dir() else None)
        summary = _extract_locked(manifest, store_path, cfg, backbones, device, progress, on_total)
    summary.interrupted_writer = lock.interrupted
    return summary


@dataclass
class Pending:
    """A store opened for this manifest and what is left to compute in it."""

    store: FeatureStore
    rows: pd.DataFrame
    chunks: list[int]  # not done: never computed, lost, or holding rows that failed before
    summary: ExtractSummary  # what was appended, skipped, retried and lost; filled in by ``fill_chunks``

    def passes(self, chunks: list[int] | None = None) -> list[list[int]]:
        """``chunks`` (default: every pending one) grouped into loader passes."""
        status = self.rows["status"].to_numpy().reshape(-1, self.store.chunk_rows)
        return loader_passes(self.chunks if chunks is None else chunks,
                             self.rows["augment"].to_numpy()[::self.store.chunk_rows],
                             (status == STATUS_PADDING).any(axis=1))


def plan_pending(manifest: Manifest, store_path: Path, cfg: RunConfig, backbones: Backbones,
                 device: str) -> Pending:
    """Create or extend the store for this manifest and find the chunks still to compute. The caller holds the
    store's lock."""
    identity = store_identity(cfg, backbones)
    store, appended = open_or_extend(store_path, manifest, cfg, identity, device, backbones.seen, backbones.checks)
    rows = store.rows()
    status = rows["status"].to_numpy()
    real_per_chunk = (status != STATUS_PADDING).reshape(-1, store.chunk_rows).sum(axis=1)
    failed_per_chunk = (status == STATUS_FAILED).reshape(-1, store.chunk_rows).sum(axis=1)
    marked = store.done_chunks()
    lost = store.lost_chunks(status, marked)
    done = marked & (failed_per_chunk == 0) & ~lost
    summary = ExtractSummary(rows_appended=appended, rows_skipped=int(real_per_chunk[done].sum()),
                             rows_retried=int(failed_per_chunk.sum()), chunks_lost=int(lost.sum()))
    return Pending(store, rows, [k for k in range(store.n_chunks) if not done[k]], summary)


def pending_rows(pending: Pending, chunks: list[int] | None = None) -> int:
    """Rows (padding left out) in ``chunks`` (default: every pending chunk)."""
    status = pending.rows["status"].to_numpy().reshape(-1, pending.store.chunk_rows)
    return int((status[pending.chunks if chunks is None else chunks] != STATUS_PADDING).sum())


def _extract_locked(manifest: Manifest, store_path: Path, cfg: RunConfig, backbones: Backbones, device: str,
                    progress: Callable[[int], None] | None, on_total: Callable[[int], None] | None) -> ExtractSummary:
    pending = plan_pending(manifest, store_path, cfg, backbones, device)
    if on_total:
        on_total(pending_rows(pending))
    store = pending.store
    log.info(f"extracting on the {device.upper()} ({usable_cores()} cores)" if device == "cpu" else
             f"extracting on the {device.upper()}")
    log.info("backbones " + ", ".join(f"{n} ({b['dim']} features, weights {b['weights']}, {b['engine']} "
                                      f"{b['precision']})" for n, b in backbones.info.items())
             + f"; stored as {cfg.features.store_dtype}; "
             f"{len(pending.chunks):,} of {store.n_chunks:,} chunks to compute ({store.chunk_rows:,} rows each)")
    start = time.perf_counter()
    fill_chunks(manifest, pending, pending.passes(), cfg, backbones, pending.summary, progress)
    pending.summary.seconds = time.perf_counter() - start
    return pending.summary


def fill_chunks(manifest: Manifest, pending: Pending, passes: list[list[int]], cfg: RunConfig,
                backbones: Backbones, summary: ExtractSummary,
                progress: Callable[[int], None] | None = None, guard: Callable[[], None] | None = None) -> None:
    """Compute and write the chunks of ``passes`` (each a run of consecutive chunks read in one loader pass),
    adding what was done to ``summary``: the whole loop of one process, or one worker's unit of a Dask run
    (``guard``: called before each chunk is written, see ``ChunkWriter``)."""
    store, rows = pending.store, pending.rows
    status = rows["status"].to_numpy()
    index = {cid: i for i, cid in enumerate(manifest.table["cell_id"])}
    dims = {n: b["dim"] for n, b in backbones.info.items()}
    augment_of_chunk = rows["augment"].to_numpy()[::store.chunk_rows]
    with ChunkWriter(store, workers=cfg.features.writers, guard=guard) as writer:
        for run in passes:
            with span(summary.seconds_in, "pass setup"):
                window = rows.iloc[run[0] * store.chunk_rows:(run[-1] + 1) * store.chunk_rows]
                real = window[window["status"] != STATUS_PADDING]
                table = _pass_table(manifest, index, real, store.path)
                global_rows = real.index.to_numpy()
                loader = CellLoader(table, manifest.root, cfg, augment=bool(augment_of_chunk[run[0]]),
                                    normalizations=backbones.normalizations)
                delivered = np.zeros(len(table), dtype=bool)
            buffers: dict[int, _ChunkBuffer] = {}

            def deliver(positions: np.ndarray, feats: dict[str, np.ndarray] | None) -> None:
                where = global_rows[positions]
                for k in np.unique(where // store.chunk_rows):
                    if k not in buffers:
                        buffers[k] = _ChunkBuffer(status[store.chunk_slice(k)], dims, cfg.features.store_dtype)
                    mine = where // store.chunk_rows == k
                    buffers[k].put(where[mine] - k * store.chunk_rows,
                                   None if feats is None else {n: v[mine] for n, v in feats.items()})
                    if buffers[k].complete:
                        writer.put(k, buffers[k].features, buffers[k].status)
                        summary.chunks_written.append(int(k))
                        del buffers[k]
                if progress:
                    progress(len(positions))

            def land(flight: _InFlight) -> None:
                with span(summary.seconds_in, "device wait"):
                    host = flight.wait()
                with span(summary.seconds_in, "host + hand-off"):
                    feats = {name: storable(values.numpy(), name, cfg.features.store_dtype)
                             for name, values in host.items()}
                    delivered[flight.positions] = True
                    summary.rows_written += len(flight.positions)
                    deliver(flight.positions, feats)

            previous = None
            with torch.inference_mode():
                for batch in _timed_batches(loader, summary.seconds_in):
                    with span(summary.seconds_in, "launch"):
                        current = _InFlight.launch(batch, backbones)
                    if previous is not None:
                        land(previous)  # while the device computes ``current``
                    previous = current
            if previous is not None:
                land(previous)
            summary.failures += loader.failures
            missing = np.flatnonzero(~delivered)
            if len(missing):
                summary.rows_failed += len(missing)
                with span(summary.seconds_in, "host + hand-off"):
                    deliver(missing, None)
        drain = time.perf_counter()
    summary.seconds_in["final writes"] += time.perf_counter() - drain
