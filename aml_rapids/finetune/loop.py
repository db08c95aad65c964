"""One training step, an epoch of them, and the passes without gradients (validation, prediction), after
torchvision's reference ``train_one_epoch`` / ``evaluate``.

The loop takes any loader of ``Batch`` objects and one device; several GPUs later wrap the model in DDP and give
each rank its shard of the epoch's table (``CellLoader(shard_id, num_shards)``), and nothing here changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import TrainingDiverged
from .task import Task


@dataclass
class StepResult:
    step: int
    loss: float
    accuracy: float
    lr: float  # the learning rate the step was taken with
    rows: int
    last_position: int  # the table position of the batch's last row


def step_seed(seed: int, step: int) -> int:
    """The seed of a step's dropout: a function of (seed, step) alone, so a resumed run draws as before."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def train_one_epoch(task: Task, loader: Iterable, labels: np.ndarray, optimizer, scheduler, loss_fn,
                    first_step: int, seed: int) -> Iterator[StepResult]:
    """Yield each step's result after its update; ``labels`` are class indices by loader table position. The
    model's modes are the caller's (training, but frozen norm layers left in eval: ``FreezeSchedule``)."""
    step = first_step
    for batch in loader:
        step += 1
        torch.manual_seed(step_seed(seed, step))
        images = next(iter(batch.images.values())).to(task.device)
        target = torch.from_numpy(labels[batch.positions]).to(task.device)
        logits = task.forward(images)
        loss = loss_fn(logits, target)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the training loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        accuracy = (logits.argmax(1) == target).float().mean().item()
        yield StepResult(step, loss.item(), accuracy, lr, len(batch.positions), int(batch.positions.max()))


@torch.no_grad()
def predict(task: Task, loader: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (rows, classes) and the table positions they belong to, in eval mode; every module's
    mode is restored afterwards."""
    modes = {module: module.training for module in task.model.modules()}
    task.model.eval()
    probs, positions = [], []
    for batch in loader:
        images = next(iter(batch.images.values())).to(task.device)
        probs.append(torch.softmax(task.forward(images), 1).cpu().numpy())
        positions.append(batch.positions)
    for module, training in modes.items():
        module.training = training
    if not probs:
        return np.empty((0, len(task.classes)), np.float32), np.empty(0, np.int64)
    return np.concatenate(probs), np.concatenate(positions)


def validate(task: Task, loader: Iterable, labels: np.ndarray, loss_fn, step: int) -> tuple[float, float]:
    """Mean loss and accuracy over the validation rows (those the loader could read); a loss that is not a
    number (the weights diverged) stops the run."""
    proba, positions = predict(task, loader)
    target = torch.from_numpy(labels[positions])
    loss = loss_fn(torch.log(torch.from_numpy(proba).clamp_min(1e-12)), target).item()
    if not np.isfinite(loss):
        raise TrainingDiverged(f"the validation loss became {loss} at step {step}")
    return loss, float((proba.argmax(1) == labels[positions]).mean())
