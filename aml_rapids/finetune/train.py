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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..config import FinetuneConfig, RunConfig
from ..data.manifest import Manifest
from ..data.scan import Problem
from ..errors import OutputError, TrainingDiverged
from ..evaluate.report import split_protocol, write_report
from ..features.backbones import get_spec
from ..features.extract import preprocess_identity
from ..loader.loader import CellLoader, resolve_device
from ..logs import log
from ..outputs import atomic_write_text, file_sha256, prepare_output_dir
from ..provenance import current_run_id, machine_info, software_versions, usable_cores
from . import checkpoint
from .checkpoint import BEST, CHECKPOINT, Position
from .curves import plot_curves
from .data import Tables, epoch_table, training_tables
from .loop import predict, train_one_epoch, validate
from .record import FINETUNE_JSON, SEEN_CELLS, read_record, write_about, write_seen_cells
from .schedule import FreezeSchedule
from .task import Task, choose_precision, loss_function, make_task

STEPS = "steps.csv"
EVAL = "eval-test"
OUTPUTS = (CHECKPOINT, BEST, FINETUNE_JSON, SEEN_CELLS, STEPS, "curves.png", "curves.svg", EVAL, "runs",
           "config.yaml")
RESUMABLE = ("epochs", "max_steps", "patience", "checkpoint_every")  # may change between the parts of a run


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


def stop_reason(position: Position, ft: FinetuneConfig) -> str | None:
    """Why the run stops where it stands (None: it goes on): patience, ``max_steps`` or the last epoch."""
    if ft.patience and position.bad_validations >= ft.patience:
        return f"early stopping: {ft.patience} validations without a lower loss than step {position.best_step}'s"
    if ft.max_steps and position.step >= ft.max_steps:
        return f"max_steps: stopped after {ft.max_steps:,} steps"
    if position.epoch >= ft.epochs:
        return f"finished {ft.epochs} epochs"
    return None


def run_identity(cfg: RunConfig, manifest: Manifest, digest: str, task: Task) -> dict:
    """What a checkpoint must share with the run that resumes it (``digest``: the manifest's)."""
    policy = {k: v for k, v in cfg.finetune.model_dump().items() if k not in RESUMABLE or
              (k == "epochs" and cfg.finetune.lr_schedule == "cosine")}
    return {"backbone": task.spec.name, "base_weights": task.base.sha256 or "none", "classes": task.classes,
            "manifest": digest, "split": manifest.meta.get("split"), "policy": policy,
            "preprocess": {k: v for k, v in preprocess_identity(cfg).items() if k != "augment_draws"}}


def prepare_folder(out: Path, overwrite: bool) -> Path:
    """A new folder, or one holding only a fine-tuning's files (resumed, or with ``overwrite`` emptied); what a
    write killed midway left (``.*.tmp``) is removed."""
    prepare_output_dir(out, "fine-tuning folder")
    leftovers = [p for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS and p not in leftovers)
    if foreign:
        raise OutputError(f"fine-tuning folder {out} holds files a fine-tuning did not write "
                          f"({', '.join(foreign[:5])}); use a new or empty folder")
    for path in leftovers + ([p for p in out.iterdir() if p.name not in ("runs", "config.yaml")] if overwrite else []):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return out


def _optimizer(task: Task, cfg: RunConfig, steps_per_epoch: int):
    ft = cfg.finetune
    optimizer = torch.optim.Adam(task.model.parameters(), lr=ft.lr, weight_decay=ft.weight_decay)
    total = max(1, ft.epochs * steps_per_epoch)
    factor = ((lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))) if ft.lr_schedule == "cosine"
              else (lambda s: 1.0))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _about(run: "Run") -> dict:
    """finetune.json: what the run is, and how far it got."""
    position, task, tables, manifest = run.position, run.task, run.tables, run.manifest
    best = {"step": position.best_step, "epoch": position.best_epoch,
            "val_loss": None if position.best_step is None else position.best_loss,
            "val_accuracy": position.best_accuracy}
    return {"aml_rapids": __version__, "run_id": current_run_id(), "backbone": task.spec.name,
            "base_weights": {"source": task.base.source, "sha256": task.base.sha256, "pretrained": task.base.pretrained},
            "manifest": {"path": str(run.where), "digest": run.digest,
                         "source": manifest.meta.get("source", str(manifest.root))},
            "split": manifest.meta.get("split"), "classes": task.classes,
            "rows": {"train_oversampled": len(tables.train), "train_cells": int(tables.train["cell_id"].nunique()),
                     "val": len(tables.val), "test": len(tables.test)},
            "seen_cells": run.seen, "policy": run.ft.model_dump(), "status": position.stopped or "running",
            "epochs_run": position.epoch, "steps": position.step, "best": best, "weights": {"file": BEST},
            "precision": task.precision, "precision_probe_images_per_s": task.measured or None, "device": run.device,
            "train_images_per_s": _rate(position.history), "wall_seconds": round(position.seconds, 1),
            "failed": [{"path": path, "reason": why} for path, why in position.failures.items()],
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
    spec = get_spec(ft.backbone)
    spec.check_input(cfg.loader.image_size)
    FreezeSchedule(spec, ft.freeze_epochs, ft.unfreeze)  # a schedule this network cannot follow: said before any work
    out = prepare_folder(Path(out), overwrite)
    task = make_task(ft, tables.classes, device, cfg.features.channels_last)
    digest = manifest.digest()  # hashes every row: once a run
    identity = run_identity(cfg, manifest, digest, task)
    steps_per_epoch = math.ceil(len(tables.train) / ft.batch_size)
    optimizer, scheduler = _optimizer(task, cfg, steps_per_epoch)
    state = checkpoint.load(out, identity)
    run = Run(cfg, manifest, where, out, task, tables, optimizer, scheduler, identity, device)
    if state is None:
        for stale in (BEST, STEPS, EVAL):  # a run killed before its first checkpoint: begun again
            path = out / stale
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        choose_precision(task, ft, cfg.loader.image_size)
    else:
        run.resume(state)
    run.seen = write_seen_cells(out, pd.concat([tables.train, tables.val]))
    write_about(out, run.about())
    if on_total:  # the rows still to train (a resumed run has done some)
        planned = min(len(tables.train) * ft.epochs, min(ft.epochs * steps_per_epoch, ft.max_steps or math.inf)
                      * ft.batch_size)
        on_total(max(0, int(planned) - sum(h["rows"] for h in run.position.history)))
    try:
        run.train(progress)
    except TrainingDiverged as exc:
        raise run.diverged(exc) from None
    return _finish(run)


class Run:
    """One fine-tuning as it goes: the task, its optimizer and where it stands; ``train`` runs the epochs."""

    def __init__(self, cfg: RunConfig, manifest: Manifest, where: Path, out: Path, task: Task, tables: Tables,
                 optimizer, scheduler, identity: dict, device: str):
        self.cfg, self.ft, self.manifest, self.where, self.out = cfg, cfg.finetune, manifest, where, out
        self.task, self.tables, self.optimizer, self.scheduler = task, tables, optimizer, scheduler
        self.identity, self.device = identity, device
        self.position, self.best, self.saved_step, self.seen = Position(), None, None, {}
        self.digest = identity["manifest"]  # the manifest's
        self.loss_fn, self.val_labels = loss_function(self.ft), tables.labels(tables.val)
        self.schedule = FreezeSchedule(task.spec, self.ft.freeze_epochs, self.ft.unfreeze)
        self.train_cfg = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"batch_size": self.ft.batch_size})})

    def resume(self, state: dict) -> None:
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.position, self.best, self.saved_step = state["position"], state["best_model"], state["position"].step
        if self.best is not None:
            checkpoint.save_best(self.out, self.best)  # best.pt as the checkpoint knows it
        if state["run"]["device"] == self.device:
            self.task.precision, self.task.measured = state["run"]["precision"], state["run"]["measured"]
        else:
            choose_precision(self.task, self.ft, self.cfg.loader.image_size)
            log.warning(f"the checkpoint was trained on the {state['run']['device'].upper()}; going on on the "
                        f"{self.device.upper()} in {self.task.precision}")
        log.info(f"resuming {self.out / CHECKPOINT}: epoch {self.position.epoch + 1}, step {self.position.step}")

    def loader(self, table: pd.DataFrame, augment: bool, epoch: int | None, settings: RunConfig | None = None
               ) -> CellLoader:
        return CellLoader(table, self.manifest.root, settings or self.cfg, augment=augment, epoch=epoch,
                          normalizations={self.task.spec.name: self.task.spec.normalization})

    def keep_failures(self, used: CellLoader) -> None:
        self.position.failures.update({p.path: p.reason for p in used.failures})

    def about(self) -> dict:
        return _about(self)

    def validation(self, epoch: int) -> None:
        position, val_loader = self.position, self.loader(self.tables.val, True, None)
        loss, accuracy = validate(self.task, val_loader, self.val_labels, self.loss_fn, position.step)
        self.keep_failures(val_loader)
        position.history[-1].update(val_loss=loss, val_accuracy=accuracy)
        improved = loss < position.best_loss
        if improved:
            self.best = checkpoint.host_copy(self.task.model)
            checkpoint.save_best(self.out, self.best)
            position.best_loss, position.best_accuracy = loss, accuracy
            position.best_step, position.best_epoch, position.bad_validations = position.step, epoch + 1, 0
        else:
            position.bad_validations += 1
        log.info(f"step {position.step:,} (epoch {epoch + 1}): training loss {position.history[-1]['train_loss']:.4f}"
                 f", validation loss {loss:.4f}, accuracy {accuracy:.4f}" + (" (best)" if improved else ""))

    def save(self) -> None:
        if not all(torch.isfinite(p).all() for p in self.task.model.parameters()):
            raise TrainingDiverged(f"the weights hold NaN or Inf after step {self.position.step}")
        checkpoint.save(self.out, self.task.model, self.optimizer, self.scheduler, self.position, self.identity,
                        self.cfg.model_dump(mode="json"), self.best,
                        {"precision": self.task.precision, "measured": self.task.measured, "device": self.device})
        self.saved_step = self.position.step
        atomic_write_text(self.out / STEPS, pd.DataFrame(self.position.history, columns=STEP_COLUMNS).to_csv(index=False))
        write_about(self.out, self.about())

    def train(self, progress: Callable[[int], None] | None) -> None:
        """Epochs until ``stop_reason`` says stop; a checkpoint after each (and every ``checkpoint_every``)."""
        ft, position = self.ft, self.position
        position.stopped = stop_reason(position, ft)  # a resumed run may go on under larger limits
        while position.stopped is None:
            epoch, done_before = position.epoch, position.epoch_rows
            trained = self.schedule.apply(self.task.model, epoch)
            if done_before == 0:
                log.info(f"epoch {epoch + 1}/{ft.epochs}: {len(self.tables.train):,} rows, {trained:,} parameters "
                         "training")
            train_loader = self.loader(epoch_table(self.tables.train, ft.seed, epoch).iloc[done_before:], True,
                                       epoch, self.train_cfg)
            clock = time.perf_counter()
            for result in train_one_epoch(self.task, train_loader, self.tables.labels(train_loader.table),
                                          self.optimizer, self.scheduler, self.loss_fn, position.step, ft.seed):
                position.step, position.epoch_rows = result.step, done_before + result.last_position + 1
                position.history.append({"step": result.step, "epoch": epoch + 1, "train_loss": result.loss,
                                         "train_accuracy": result.accuracy, "lr": result.lr, "rows": result.rows,
                                         "step_seconds": time.perf_counter() - clock, "val_loss": None,
                                         "val_accuracy": None})
                if progress:
                    progress(result.rows)
                if result.step % ft.val_every == 0:
                    self.validation(epoch)
                position.stopped = stop_reason(position, ft)
                position.seconds += time.perf_counter() - clock  # the step and its validation; not checkpoints
                if position.stopped:
                    break
                if ft.checkpoint_every and result.step % ft.checkpoint_every == 0:
                    self.save()
                clock = time.perf_counter()
            self.keep_failures(train_loader)
            if position.stopped is None:
                if position.history and position.history[-1]["val_loss"] is None:
                    self.validation(epoch)
                position.epoch, position.epoch_rows = epoch + 1, 0
                position.stopped = stop_reason(position, ft)
            self.save()
        if position.best_step is None and position.history:  # stopped before any validation: best.pt needs one
            self.validation(position.epoch)
            self.save()

    def diverged(self, exc: TrainingDiverged) -> TrainingDiverged:
        """The error to stop with: what diverged, what was kept, what to do; finetune.json says so too."""
        position = self.position
        position.stopped = f"diverged: {exc}"
        write_about(self.out, self.about())
        kept = [f"{self.out / CHECKPOINT} (step {self.saved_step})" if self.saved_step is not None else "",
                f"{self.out / BEST} (step {position.best_step})" if position.best_step is not None else ""]
        return TrainingDiverged(f"{exc}; kept: {', '.join(k for k in kept if k) or 'nothing (no step had finished)'}. "
                                "Lower finetune.lr (or turn on finetune.label_smoothing) and start again with "
                                "--overwrite")


STEP_COLUMNS = ["step", "epoch", "train_loss", "train_accuracy", "lr", "rows", "step_seconds", "val_loss",
                "val_accuracy"]


def _finish(run: Run) -> FinetuneSummary:
    """Curves, the head's test report with the best weights, and finetune.json's final state."""
    out, task, position, tables = run.out, run.task, run.position, run.tables
    about = run.about()
    about["weights"]["sha256"] = file_sha256(out / BEST)
    write_about(out, about)
    title = (f"{task.spec.name} fine-tuned on {about['manifest']['source']} ({position.step:,} steps, "
             f"{position.stopped})")
    plot_curves(pd.DataFrame(position.history, columns=STEP_COLUMNS), position.best_step, title, out / "curves.png")
    head = None
    if len(tables.test):
        task.model.load_state_dict(torch.load(out / BEST, map_location=task.device, weights_only=True))
        test_loader = run.loader(tables.test, False, None)
        proba, positions = predict(task, test_loader)
        run.keep_failures(test_loader)
        split = run.manifest.meta.get("split") or {}
        weights = {"weights": str(out / BEST), "pretrained": task.base.pretrained, "dim": task.spec.dim,
                   "finetuned": read_record(out / BEST).provenance()}
        info = {"split_protocol": split_protocol(split), "backbones": {task.spec.name: weights},
                "backend": "torch: the fine-tuned network's own head",
                "source": {"manifest": str(run.where), "manifest_digest": about["manifest"]["digest"], "split": split,
                           "finetune": str(out), "weights_sha256": about["weights"]["sha256"]}}
        head = write_report(tables.test.iloc[positions].reset_index(drop=True), proba, np.asarray(task.classes), info,
                            "test", out / EVAL, run.cfg.evaluate)
        about = {**run.about(), "weights": about["weights"]}  # with the test split's failures
        write_about(out, about)
    failures = [Problem(path, why) for path, why in position.failures.items()]
    return FinetuneSummary(out, position.stopped or "running", position.epoch, position.step, about["best"],
                           about["train_images_per_s"], position.seconds, head, failures)
