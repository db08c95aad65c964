"""Training of the attention MIL network: ``train_one_epoch`` on class-balanced draws of training bags,
``validate`` on the held-out patients, and ``fit_network``, which keeps the weights of the lowest validation loss
and stops after ``patience`` epochs without a lower one.

Reduced features live on the device whole (a bag's cells are rows ``offsets[i]:offsets[i + 1]`` of ``Z``); a
training step pads its bags to the longest and masks the padding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from ..errors import ConfigError, TrainingDiverged

BYTES_PER_VALUE = 4  # float32
ACTIVATION_FACTOR = 3  # forward activations, their gradients and the optimiser's own buffers, per value
PREDICT_BAGS = 16  # bags padded together when predicting


@dataclass
class BagTensors:
    """Reduced features of some bags on one device, and their class codes."""

    Z: torch.Tensor  # (cells, components)
    offsets: np.ndarray  # bag i: rows offsets[i]:offsets[i + 1]
    codes: torch.Tensor  # (bags,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def cells(self, i: int) -> torch.Tensor:
        return self.Z[int(self.offsets[i]):int(self.offsets[i + 1])]


@dataclass
class FitRecord:
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, train_loss, val_loss, val_accuracy
    best_epoch: int = 0
    status: str = ""


def step_bytes(cells: int, bags: int, in_dim: int, hidden: int, attention_hidden: int, branches: int) -> int:
    """What one training step over ``bags`` padded bags of ``cells`` cells holds, about: each cell's input, its
    embedding, both attention branches and their scores, with gradients."""
    per_cell = in_dim + hidden + 2 * attention_hidden + 2 * branches
    return bags * cells * per_cell * BYTES_PER_VALUE * ACTIVATION_FACTOR


def check_memory(bytes_needed: int, limit: int, where: str, largest: str, advice: str) -> None:
    if bytes_needed > limit:
        raise ConfigError(f"{where} needs about {bytes_needed / 2**20:,.1f} MiB ({largest}), over the "
                          f"{limit / 2**20:,.1f} MiB allowed; {advice}")


def _batch(data: BagTensors, bags: list[int], max_cells: int | None, generator: torch.Generator):
    """The bags' cells (at most ``max_cells`` of each, drawn without replacement), padded, with their mask."""
    pieces = []
    for i in bags:
        cells = data.cells(i)
        if max_cells and len(cells) > max_cells:
            cells = cells[torch.randperm(len(cells), generator=generator)[:max_cells].to(cells.device)]
        pieces.append(cells)
    lengths = torch.tensor([len(p) for p in pieces], device=data.Z.device)
    mask = torch.arange(int(lengths.max()), device=data.Z.device)[None, :] < lengths[:, None]
    return pad_sequence(pieces, batch_first=True), mask


def balanced_draws(codes: np.ndarray, generator: torch.Generator) -> list[int]:
    """As many bags as there are, drawn with replacement so that every class is drawn as often."""
    weights = 1.0 / np.bincount(codes)[codes]
    return torch.multinomial(torch.as_tensor(weights), len(codes), replacement=True, generator=generator).tolist()


def train_one_epoch(network, optimizer, data: BagTensors, batch_bags: int, max_cells: int | None,
                    generator: torch.Generator) -> float:
    network.train()
    draws = balanced_draws(data.codes.cpu().numpy(), generator)
    losses = []
    for first in range(0, len(draws), batch_bags):
        bags = draws[first:first + batch_bags]
        x, mask = _batch(data, bags, max_cells, generator)
        logits, _ = network(x, mask)
        loss = F.cross_entropy(logits, data.codes[bags])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses))


@torch.no_grad()
def bag_outputs(network, data: BagTensors, bags_per_pass: int = PREDICT_BAGS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (bags, classes) and each bag's attention (branches, cells), every cell read, ``bags_per_pass`` bags
    padded together at a time."""
    network.eval()
    logits, attention = [], []
    for first in range(0, len(data), bags_per_pass):
        bags = list(range(first, min(first + bags_per_pass, len(data))))
        x, mask = _batch(data, bags, None, None)
        out, weights = network(x, mask)
        logits.append(out)
        attention += [weights[j, :, :int(mask[j].sum())] for j in range(len(bags))]
    return torch.cat(logits), attention


def validate(network, data: BagTensors, n_classes: int) -> tuple[float, float]:
    """Class-balanced cross-entropy (each class's patients weigh as much in all) and accuracy on the bags."""
    logits, _ = bag_outputs(network, data)
    counts = torch.bincount(data.codes, minlength=n_classes).float()
    weight = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    loss = F.cross_entropy(logits, data.codes, weight=weight.to(logits.device))
    return float(loss), float((logits.argmax(dim=1) == data.codes).float().mean())


def fit_network(network, train: BagTensors, val: BagTensors, n_classes: int, epochs: int, patience: int,
                lr: float, weight_decay: float, batch_bags: int, max_cells: int | None, seed: int) -> FitRecord:
    """Train in place; the network ends with the weights of its lowest validation loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=weight_decay)
    record, best_loss, best_state = FitRecord(), float("inf"), None
    for epoch in range(1, epochs + 1):
        train_loss = train_one_epoch(network, optimizer, train, batch_bags, max_cells, generator)
        val_loss, val_accuracy = validate(network, val, n_classes)
        record.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                               "val_accuracy": val_accuracy})
        if val_loss < best_loss:
            best_loss, best_state, record.best_epoch = val_loss, copy.deepcopy(network.state_dict()), epoch
        elif epoch - record.best_epoch >= patience:
            record.status = f"stopped early at epoch {epoch}: no lower validation loss for {patience} epochs"
            break
    else:
        record.status = f"ran all {epochs} epochs"
    if best_state is None:
        raise TrainingDiverged(f"the validation loss was never a finite number in {len(record.history)} epochs "
                               f"(last {record.history[-1]['val_loss']}): lower patients.lr")
    network.load_state_dict(best_state)
    return record
