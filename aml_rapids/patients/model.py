"""The patient-level classifier as one estimator: each backbone's features row-z-scored (as the cell classifier
does) and reduced by its own PCA, then the attention MIL network (``network``) trained by ``fit``.

The PCA is the eigen-decomposition of the training cells' covariance, computed by torch on the same device as the
network: deterministic, and on the GPU when there is one. Early stopping reads patients held out of training.
With tens of patients, which epoch a dozen validation patients pick varies widely from one draw of them to the
next, so the model is an ensemble (``ensemble`` members, their probabilities and attention averaged): each member
is stopped by its own fold of a stratified k-fold over the training patients, so every training patient serves
one member's early stopping. Given validation bags (a store's val split), the members share them and differ
by seed; ``ensemble`` 1 holds out ``val_fraction`` of the training patients for a single network.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedKFold, train_test_split

from ..errors import ConfigError, DataError
from .bags import Bags
from .fit import PREDICT_BAGS, BagTensors, bag_outputs, check_memory, fit_network, step_bytes
from .network import AttentionMIL

TRAINING_ADVICE = "lower patients.batch_patients or patients.max_cells (or raise patients.memory_gb on a CPU)"
PREDICTION_ADVICE = ("every cell of a bag is read at once: raise patients.memory_gb on a CPU (a model keeps the "
                     "value it was trained with: retrain), or predict the largest patients on a GPU")
# The keys of the config's ``patients`` section that the estimator takes; the others shape bags and reports.
MODEL_OPTIONS = {"attention", "pca_components", "hidden", "attention_hidden", "dropout", "lr", "weight_decay",
                 "epochs", "patience", "ensemble", "val_fraction", "batch_patients", "max_cells", "device",
                 "memory_gb", "seed"}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("patients.device cuda asked for, but torch sees no GPU here; use auto or cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def prediction_device(trained_on: str) -> torch.device:
    """Where a trained model predicts: the GPU when there is one (and it was not told cpu), else the CPU, so a
    model trained on a GPU runs on any machine."""
    return torch.device("cuda" if trained_on != "cpu" and torch.cuda.is_available() else "cpu")


def memory_limit(device: torch.device, memory_gb: float) -> int:
    """Bytes a step may hold: the GPU's free memory, or ``memory_gb`` on a CPU."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else int(memory_gb * 2**30)


def validation_parts(bags: Bags, members: int, fraction: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Positions of training and validation bags for each member: the folds of a class-stratified k-fold over
    the patients, or (one member) a class-stratified share, at least one patient of each class held out."""
    labels, counts = np.unique(bags.labels, return_counts=True)
    need = max(members, 2)
    if counts.min() < need:
        raise DataError(f"class {labels[counts.argmin()]} has {counts.min()} training patient(s): too few to hold "
                        f"some out for early stopping ({need} needed with patients.ensemble = {members}); lower "
                        "patients.ensemble or give more patients (train: or a store with a val split, which "
                        "the networks then share)")
    if members > 1:
        return list(StratifiedKFold(members, shuffle=True, random_state=seed).split(np.zeros(len(bags)), bags.labels))
    n_val = min(max(len(labels), round(fraction * len(bags))), len(bags) - len(labels))
    return [tuple(train_test_split(np.arange(len(bags)), test_size=n_val, stratify=bags.labels, random_state=seed))]


class PatientMILClassifier(ClassifierMixin, BaseEstimator):
    """``block_dims`` says where each backbone's columns are in a bag's features; the other options are the
    config's ``patients`` section (``MODEL_OPTIONS``)."""

    def __init__(self, block_dims=(1280,), attention="gated", pca_components=64, hidden=128, attention_hidden=64,
                 dropout=0.25, lr=5e-4, weight_decay=1e-4, epochs=100, patience=15, ensemble=5, val_fraction=0.2,
                 batch_patients=4, max_cells=512, device="auto", memory_gb=4.0, seed=0):
        self.block_dims = block_dims
        self.attention = attention
        self.pca_components = pca_components
        self.hidden = hidden
        self.attention_hidden = attention_hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.patience = patience
        self.ensemble = ensemble
        self.val_fraction = val_fraction
        self.batch_patients = batch_patients
        self.max_cells = max_cells
        self.device = device
        self.memory_gb = memory_gb
        self.seed = seed

    def _blocks(self, X: torch.Tensor) -> list[torch.Tensor]:
        if X.shape[1] != sum(self.block_dims):
            raise DataError(f"features have {X.shape[1]} columns, the model expects {sum(self.block_dims)} "
                            f"({' + '.join(map(str, self.block_dims))})")
        blocks = torch.split(X, list(self.block_dims), dim=1)  # each row to zero mean and unit (population) spread
        return [(b - b.mean(dim=1, keepdim=True)) / b.std(dim=1, keepdim=True, correction=0).clamp_min(1e-12)
                for b in blocks]

    def _fit_reduction(self, X: torch.Tensor) -> None:
        self.means_, self.components_ = [], []
        for block in self._blocks(X):
            mean = block.mean(dim=0)
            centred = block - mean
            values, vectors = torch.linalg.eigh(centred.T @ centred / max(len(block) - 1, 1))
            keep = min(self.pca_components, block.shape[1], len(block))
            self.means_.append(mean.cpu())
            self.components_.append(vectors[:, values.argsort(descending=True)[:keep]].cpu())

    def _reduce(self, X: np.ndarray, device: torch.device) -> torch.Tensor:
        blocks = self._blocks(torch.as_tensor(X, dtype=torch.float32, device=device))
        return torch.cat([(block - mean.to(device)) @ components.to(device)
                          for block, mean, components in zip(blocks, self.means_, self.components_)], dim=1)

    def _tensors(self, bags: Bags, device: torch.device) -> BagTensors:
        index = {label: code for code, label in enumerate(self.classes_)}
        codes = np.array([index.get(label, -1) for label in bags.labels], dtype=np.int64)  # -1: not a known class
        return BagTensors(self._reduce(bags.X, device), bags.offsets, torch.as_tensor(codes, device=device))

    def _check_memory(self, bags: Bags, device: torch.device, batch: int, cells_cap: int | None, what: str,
                      advice: str = TRAINING_ADVICE) -> None:
        largest = int(bags.sizes.argmax())
        cells = int(bags.sizes[largest]) if cells_cap is None else min(cells_cap, int(bags.sizes[largest]))
        branches = len(self.classes_) if self.attention == "per_class" else 1
        need = step_bytes(cells, batch, sum(len(c.T) for c in self.components_), self.hidden, self.attention_hidden,
                          branches)
        check_memory(need, memory_limit(device, self.memory_gb), what,
                     f"{batch} bag(s) of up to {cells:,} cells; patient {bags.keys[largest]} has "
                     f"{int(bags.sizes[largest]):,}", advice)

    def _members(self, bags: Bags, val: Bags | None) -> list[tuple[Bags, Bags, int]]:
        """(training bags, validation bags, seed) of each member."""
        if val is not None:
            return [(bags, val, self.seed + m) for m in range(self.ensemble)]
        return [(bags.subset(train_at), bags.subset(val_at), self.seed + m)
                for m, (train_at, val_at) in enumerate(validation_parts(bags, self.ensemble, self.val_fraction,
                                                                        self.seed))]

    def fit(self, bags: Bags, val: Bags | None = None):
        started = time.perf_counter()
        self.classes_ = np.unique(bags.labels)
        if len(self.classes_) < 2:
            raise DataError(f"training patients hold a single class ({self.classes_[0]!r}); need at least two")
        unknown = sorted(set(val.labels) - set(self.classes_)) if val is not None else []
        if unknown:
            raise DataError(f"validation patients of class(es) {', '.join(map(str, unknown))}, which no training patient "
                            f"has (e.g. {val.keys[np.isin(val.labels, unknown)][0]}): early stopping could not score "
                            "them; split so that every class has training patients")
        members = self._members(bags, val)
        device = resolve_device(self.device)
        self._fit_reduction(torch.as_tensor(bags.X, dtype=torch.float32, device=device))
        self._check_memory(bags, device, self.batch_patients, self.max_cells, "a training step")
        for _, held, _ in members:
            self._check_memory(held, device, PREDICT_BAGS, None, "validating bags")
        self.networks_, self.members_ = [], []
        for train, held, seed in members:
            train_data, val_data = self._tensors(train, device), self._tensors(held, device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                network = AttentionMIL(train_data.Z.shape[1], len(self.classes_), self.hidden,
                                       self.attention_hidden, self.dropout, self.attention == "per_class").to(device)
                record = fit_network(network, train_data, val_data, len(self.classes_), self.epochs, self.patience,
                                     self.lr, self.weight_decay, self.batch_patients, self.max_cells, seed)
            self.networks_.append(network.cpu())
            self.members_.append({"training_patients": len(train), "validation_patients": len(held),
                                  "epochs_run": len(record.history), "best_epoch": record.best_epoch,
                                  "status": record.status, "history": record.history})
        self.training_patients_ = list(bags.keys) + ([] if val is None else list(val.keys))
        self.fit_seconds_ = time.perf_counter() - started
        self.backend_ = "torch"
        return self

    def outputs(self, bags: Bags) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities per bag (bags, classes), and each cell's attention (cells, branches): the share
        of its bag's pooled embedding it makes up, summing to 1 over a bag (per branch); both the members' mean."""
        device = prediction_device(self.device)
        self._check_memory(bags, device, PREDICT_BAGS, None, "predicting bags", PREDICTION_ADVICE)
        data = self._tensors(bags, device)
        probas, attentions = [], []
        for network in self.networks_:
            network = copy.deepcopy(network).to(device) if device.type != "cpu" else network
            logits, attention = bag_outputs(network, data)
            probas.append(logits.softmax(dim=1).cpu().numpy().astype(np.float64))
            attentions.append(torch.cat([a.T for a in attention]).cpu().numpy())
        return np.mean(probas, axis=0), np.mean(attentions, axis=0)

    def predict_proba(self, bags: Bags) -> np.ndarray:
        return self.outputs(bags)[0]

    def predict(self, bags: Bags) -> np.ndarray:
        return self.classes_[self.predict_proba(bags).argmax(axis=1)]
