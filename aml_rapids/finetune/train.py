"""A fine-tuning run: the manifest's train split (oversampled and augmented as extraction does, new
augmentations every epoch, reshuffled every epoch) through the task, validated every ``val_every`` steps on
augmented validation images, the best weights kept, a checkpoint at every epoch's end (and every
``checkpoint_every`` steps), resumed from when the same command runs again.

It writes into its folder: ``best.pt`` (the whole network, a plain state_dict that ``features.backbones[].weights``
loads), ``checkpoint.pt``, ``finetune.json`` and ``seen_cells.csv`` (``record``), ``steps.csv`` (one line per
step), ``curves.png`` and, when the manifest has a test split, ``eval-test/``: the fine-tuned network's own head
evaluated as ``evaluate`` reports the stacking classifier.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..config import FinetuneConfig, RunConfig
from ..data.manifest import Manifest
from ..data.scan import Problem
from ..errors import DataError, OutputError, TrainingDiverged
from ..evaluate.report import write_report
from ..loader.loader import CellLoader, resolve_device
from ..loader.oversample import loader_table
from ..logs import log
from ..outputs import atomic_write_text, file_sha256, prepare_output_dir
from ..provenance import current_run_id, machine_info, software_versions, usable_cores
from . import checkpoint
from .checkpoint import BEST, CHECKPOINT, Position
from .curves import plot_curves
from .loop import predict, train_one_epoch, validate
from .record import FINETUNE_JSON, SEEN_CELLS, read_record, write_about, write_seen_cells
from .schedule import FreezeSchedule
from .task import Task, choose_precision, loss_function, make_task

STEPS = "steps.csv"
EVAL = "eval-test"
OUTPUTS = (CHECKPOINT, BEST, FINETUNE_JSON, SEEN_CELLS, STEPS, "curves.png", "curves.svg", EVAL, "runs",
           "config.yaml")
RESUMABLE = ("epochs", "max_steps", "patience", "checkpoint_every")  # may change between the parts of a run
SPLIT_PROTOCOLS = {"patient": "patient-grouped split", "image": "image-level split", "kfold": "patient-grouped k-fold"}


@dataclass
class Tables:
    """The rows of a fine-tuning: oversampled training rows, validation rows (a fixed sample if asked), test."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    classes: list[str]

    def labels(self, table: pd.DataFrame) -> np.ndarray:
        return table["label"].map({c: i for i, c in enumerate(self.classes)}).to_numpy(np.int64)


@dataclass
class FinetuneSummary:
    folder: Path
    status: str
    epochs_run: int
    steps: int
    best: dict
    train_images_per_s: float
    seconds: float
    head_test: dict | None  # the head's test report (metrics.json), if the manifest has a test split
    failed: list[Problem] = field(default_factory=list)


def stratified_sample(table: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """``n`` rows with the classes in their proportions (all rows if ``n`` is None or not smaller)."""
    if n is None or n >= len(table):
        return table.reset_index(drop=True)
    shuffled = table.sample(frac=1.0, random_state=seed)
    rank = shuffled.groupby("label").cumcount() / shuffled["label"].map(shuffled["label"].value_counts())
    return shuffled.assign(_rank=rank.to_numpy()).sort_values(["_rank", "label"], kind="stable").head(n).drop(
        columns="_rank").reset_index(drop=True)


def training_tables(manifest: Manifest, cfg: RunConfig, where: Path) -> Tables:
    table = manifest.table.assign(patient=manifest.table["patient"].fillna(""))
    if "split" not in table.columns:
        raise DataError(f"manifest {where} has no split; run `aml-rapids split` first")
    parts = {s: table[table["split"] == s] for s in ("train", "val", "test")}
    if parts["train"].empty or parts["val"].empty:
        raise DataError(f"manifest {where} has no {'train' if parts['train'].empty else 'val'} rows: fine-tuning "
                        "trains on train and validates on val; split it with split.val > 0 (the published 70/15/15)")
    classes = sorted(table["label"].unique())
    missing = [c for c in classes if not (parts["train"]["label"] == c).any()]
    if missing:
        raise DataError(f"manifest {where}: class(es) {', '.join(missing)} have no training rows; the new head "
                        "could never learn them")
    train = loader_table(table, "train", cfg.oversample.enabled, cfg.oversample.seed)
    val = stratified_sample(parts["val"], cfg.finetune.val_max_rows, cfg.finetune.seed)
    return Tables(train, val.assign(aug_index=0), parts["test"].assign(aug_index=0).reset_index(drop=True), classes)


def epoch_table(train: pd.DataFrame, seed: int, epoch: int) -> pd.DataFrame:
    """The training rows in epoch ``epoch``'s order, a function of (seed, epoch) alone."""
    order = np.random.default_rng([seed, epoch]).permutation(len(train))
    return train.iloc[order].reset_index(drop=True)


def stop_reason(position: Position, ft: FinetuneConfig) -> str | None:
    """Why the run stops where it stands (None: it goes on): patience, ``max_steps`` or the last epoch."""
    if ft.patience and position.bad_validations >= ft.patience:
        return f"early stopping: {ft.patience} validations without a lower loss than step {position.best_step}'s"
    if ft.max_steps and position.step >= ft.max_steps:
        return f"max_steps: stopped after {ft.max_steps:,} steps"
    if position.epoch >= ft.epochs:
        return f"finished {ft.epochs} epochs"
    return None


def run_identity(cfg: RunConfig, manifest: Manifest, task: Task) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    policy = {k: v for k, v in cfg.finetune.model_dump().items() if k not in RESUMABLE or
              (k == "epochs" and cfg.finetune.lr_schedule == "cosine")}
    return {"backbone": task.spec.name, "base_weights": task.base.sha256 or "none", "classes": task.classes,
            "manifest": manifest.digest(), "split": manifest.meta.get("split"), "policy": policy,
            "preprocess": {"image_size": cfg.loader.image_size, "segmentation": cfg.segmentation.model_dump(),
                           "augment": cfg.augment.model_dump(), "oversample": cfg.oversample.model_dump(),
                           "augment_seed": cfg.loader.seed}}


def prepare_folder(out: Path, overwrite: bool) -> Path:
    """A new folder, or one holding only a fine-tuning's files (resumed, or with ``overwrite`` emptied)."""
    prepare_output_dir(out, "fine-tuning folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS and not p.name.endswith(".tmp"))
    if foreign:
        raise OutputError(f"fine-tuning folder {out} holds files a fine-tuning did not write "
                          f"({', '.join(foreign[:5])}); use a new or empty folder")
    if overwrite:
        for path in out.iterdir():
            if path.name not in ("runs", "config.yaml"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out


def _optimizer(task: Task, cfg: RunConfig, steps_per_epoch: int):
    ft = cfg.finetune
    optimizer = torch.optim.Adam(task.model.parameters(), lr=ft.lr, weight_decay=ft.weight_decay)
    total = max(1, ft.epochs * steps_per_epoch)
    factor = ((lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))) if ft.lr_schedule == "cosine"
              else (lambda s: 1.0))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _about(cfg: RunConfig, manifest: Manifest, where: Path, task: Task, tables: Tables, seen: dict,
           position: Position, device: str) -> dict:
    """finetune.json: what the run is, and how far it got."""
    trained = position.history
    best = {"step": position.best_step, "epoch": position.best_epoch,
            "val_loss": None if position.best_step is None else position.best_loss,
            "val_accuracy": position.best_accuracy}
    return {"aml_rapids": __version__, "run_id": current_run_id(), "backbone": task.spec.name,
            "base_weights": asdict(task.base),
            "manifest": {"path": str(where), "digest": manifest.digest(),
                         "source": manifest.meta.get("source", str(manifest.root))},
            "split": manifest.meta.get("split"), "classes": task.classes,
            "rows": {"train_oversampled": len(tables.train), "train_cells": int(tables.train["cell_id"].nunique()),
                     "val": len(tables.val), "test": len(tables.test)},
            "seen_cells": seen, "policy": cfg.finetune.model_dump(), "status": position.stopped or "running",
            "epochs_run": position.epoch, "steps": position.step, "best": best,
            "weights": {"file": BEST}, "precision": task.precision, "device": device,
            "precision_probe_images_per_s": task.measured or None,
            "train_images_per_s": _rate(trained), "wall_seconds": round(position.seconds, 1),
            "versions": software_versions(), "machine": machine_info()}


def _rate(history: list[dict]) -> float:
    seconds = sum(h["step_seconds"] for h in history)
    return round(sum(h["rows"] for h in history) / seconds, 2) if seconds else 0.0


def finetune(manifest: Manifest, where: Path, out: Path, cfg: RunConfig, overwrite: bool = False,
             progress: Callable[[int], None] | None = None, on_total: Callable[[int], None] | None = None
             ) -> FinetuneSummary:
    """Train (or resume) the configured fine-tuning of ``manifest`` (read from ``where``) into ``out``."""
    ft = cfg.finetune
    device = "cuda" if resolve_device(cfg.loader.device) == "gpu" else "cpu"
    if device == "cpu":
        torch.set_num_threads(usable_cores())
    tables = training_tables(manifest, cfg, where)
    out = prepare_folder(Path(out), overwrite)
    task = make_task(ft, tables.classes, device, cfg.features.channels_last)
    identity = run_identity(cfg, manifest, task)
    steps_per_epoch = math.ceil(len(tables.train) / ft.batch_size)
    optimizer, scheduler = _optimizer(task, cfg, steps_per_epoch)
    state = checkpoint.load(out, identity)
    if state is None:
        choose_precision(task, ft, cfg.loader.image_size)
        position = Position()
        for stale in (BEST, STEPS, EVAL):  # a run killed before its first checkpoint: begun again
            path = out / stale
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    else:
        task.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        position, task.precision = state["position"], state["precision"]
        log.info(f"resuming {out / CHECKPOINT}: epoch {position.epoch + 1}, step {position.step}")
    seen = write_seen_cells(out, pd.concat([tables.train, tables.val]))
    about = lambda: _about(cfg, manifest, where, task, tables, seen, position, device)  # noqa: E731
    write_about(out, about())
    train_cfg = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"batch_size": ft.batch_size})})
    norms = {task.spec.name: task.spec.normalization}
    failures: dict[str, Problem] = {}

    def loader(table: pd.DataFrame, augment: bool, epoch: int | None, settings: RunConfig = cfg) -> CellLoader:
        return CellLoader(table, manifest.root, settings, augment=augment, normalizations=norms, epoch=epoch)

    def keep_failures(used: CellLoader) -> None:
        failures.update({p.path: p for p in used.failures})

    val_labels, loss_fn = tables.labels(tables.val), loss_function(ft)
    planned = min(ft.epochs * steps_per_epoch, ft.max_steps or math.inf)
    if on_total:
        on_total(int(min(len(tables.train) * ft.epochs, planned * ft.batch_size)))
    schedule = FreezeSchedule(task.spec, ft.freeze_epochs, ft.unfreeze)

    def run_validation(epoch: int) -> None:
        val_loader = loader(tables.val, True, None)
        loss, accuracy = validate(task, val_loader, val_labels, loss_fn)
        keep_failures(val_loader)
        position.history[-1].update(val_loss=loss, val_accuracy=accuracy)
        improved = loss < position.best_loss
        if improved:
            checkpoint.save_best(out, task.model)
            position.best_loss, position.best_accuracy = loss, accuracy
            position.best_step, position.best_epoch, position.bad_validations = position.step, epoch + 1, 0
        else:
            position.bad_validations += 1
        log.info(f"step {position.step:,} (epoch {epoch + 1}): training loss {position.history[-1]['train_loss']:.4f}"
                 f", validation loss {loss:.4f}, accuracy {accuracy:.4f}" + (" (best)" if improved else ""))

    saved = {"step": position.step if state else None}

    def save_checkpoint() -> None:
        saved["step"] = position.step
        checkpoint.save(out, task.model, optimizer, scheduler, position, identity, cfg.model_dump(mode="json"),
                        task.precision)
        atomic_write_text(out / STEPS, pd.DataFrame(position.history, columns=STEP_COLUMNS).to_csv(index=False))
        write_about(out, about())

    position.stopped = stop_reason(position, ft)  # a resumed run may go on under larger limits
    while position.stopped is None:
        epoch = position.epoch
        trained = schedule.apply(task.model, epoch)
        if position.epoch_rows == 0:
            log.info(f"epoch {epoch + 1}/{ft.epochs}: {len(tables.train):,} rows, {trained:,} parameters training")
        done_before = position.epoch_rows
        train_loader = loader(epoch_table(tables.train, ft.seed, epoch).iloc[done_before:], True, epoch, train_cfg)
        clock = time.perf_counter()
        steps = train_one_epoch(task, train_loader, tables.labels(train_loader.table), optimizer, scheduler, loss_fn,
                                position.step, ft.seed)
        for result in _kept_on_divergence(steps, out, saved, position):
            position.step, position.epoch_rows = result.step, done_before + result.last_position + 1
            position.history.append({"step": result.step, "epoch": epoch + 1, "train_loss": result.loss,
                                     "train_accuracy": result.accuracy, "lr": scheduler.get_last_lr()[0],
                                     "rows": result.rows, "step_seconds": time.perf_counter() - clock,
                                     "val_loss": None, "val_accuracy": None})
            if progress:
                progress(result.rows)
            if result.step % ft.val_every == 0:
                run_validation(epoch)
            position.stopped = stop_reason(position, ft)
            position.seconds += time.perf_counter() - clock  # the step and its validation; not checkpoints
            if position.stopped:
                break
            if ft.checkpoint_every and result.step % ft.checkpoint_every == 0:
                save_checkpoint()
            clock = time.perf_counter()
        keep_failures(train_loader)
        if position.stopped is None:
            if position.history and position.history[-1]["val_loss"] is None:
                run_validation(epoch)
            position.epoch, position.epoch_rows = epoch + 1, 0
            position.stopped = stop_reason(position, ft)
        save_checkpoint()
    if position.history and position.history[-1]["val_loss"] is None:  # stopped between validations
        run_validation(position.epoch)
        save_checkpoint()
    return _finish(cfg, manifest, where, out, task, tables, position, device, seen, list(failures.values()))


def _kept_on_divergence(steps, out: Path, saved: dict, position: Position):
    """The steps; a TrainingDiverged names what was kept and what to do."""
    try:
        yield from steps
    except TrainingDiverged as exc:
        kept = [f"{out / CHECKPOINT} (step {saved['step']})" if saved["step"] is not None else "",
                f"{out / BEST} (step {position.best_step})" if position.best_step is not None else ""]
        raise TrainingDiverged(f"{exc}; kept: {', '.join(k for k in kept if k) or 'nothing (no step had finished)'}. "
                               "Lower finetune.lr (or turn on finetune.label_smoothing) and start again with "
                               "--overwrite") from None


STEP_COLUMNS = ["step", "epoch", "train_loss", "train_accuracy", "lr", "rows", "step_seconds", "val_loss",
                "val_accuracy"]


def _finish(cfg: RunConfig, manifest: Manifest, where: Path, out: Path, task: Task, tables: Tables,
            position: Position, device: str, seen: dict, failures: list[Problem]) -> FinetuneSummary:
    """Curves, the head's test report with the best weights, and finetune.json's final state."""
    about = _about(cfg, manifest, where, task, tables, seen, position, device)
    about["weights"]["sha256"] = file_sha256(out / BEST)
    write_about(out, about)
    title = (f"{task.spec.name} fine-tuned on {about['manifest']['source']} ({position.step:,} steps, "
             f"{position.stopped})")
    plot_curves(pd.DataFrame(position.history, columns=STEP_COLUMNS), position.best_step, title, out / "curves.png")
    head = None
    if len(tables.test):
        task.model.load_state_dict(torch.load(out / BEST, map_location=task.device, weights_only=True))
        test_loader = CellLoader(tables.test, manifest.root, cfg, normalizations={task.spec.name: task.spec.normalization})
        proba, positions = predict(task, test_loader)
        failures += test_loader.failures
        split = manifest.meta.get("split") or {}
        weights = {"weights": str(out / BEST), "pretrained": task.base.pretrained, "dim": task.spec.dim,
                   "finetuned": read_record(out / BEST).provenance()}
        info = {"split_protocol": SPLIT_PROTOCOLS.get(split.get("method"), "unsplit"), "backbones": {task.spec.name: weights},
                "backend": "torch: the fine-tuned network's own head",
                "source": {"manifest": str(where), "manifest_digest": about["manifest"]["digest"], "split": split,
                           "finetune": str(out), "weights_sha256": about["weights"]["sha256"]}}
        head = write_report(tables.test.iloc[positions].reset_index(drop=True), proba, np.asarray(task.classes), info,
                            "test", out / EVAL, cfg.evaluate)
    about["failed"] = [{"path": p.path, "reason": p.reason} for p in failures]
    write_about(out, about)
    return FinetuneSummary(out, position.stopped or "running", position.epoch, position.step, about["best"],
                           about["train_images_per_s"], position.seconds, head, failures)
