"""The network being fine-tuned: a registry backbone with a new head for the manifest's classes, its loss, and
the precision it trains in: bf16 autocast on a GPU; on a CPU whichever of fp32 and bf16 trains faster here,
measured on the network itself (CPUs differ: some run bf16 at twice fp32's speed, others at an eighth)."""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import FinetuneConfig
from ..features.backbones import BackboneSpec, get_spec
from ..features.weights import WeightsError, WeightsInfo, build_network


@dataclass
class Task:
    """What one fine-tuning trains: the whole network (its new head included), its spec and base weights."""

    model: nn.Module
    spec: BackboneSpec
    base: WeightsInfo
    classes: list[str]
    device: str  # "cuda" or "cpu"
    precision: str  # "bf16" or "fp32"
    channels_last: bool
    measured: dict[str, float] = field(default_factory=dict)  # training images/s per precision, where probed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits in float32 for a batch of loader images."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        with _autocast(self.device, self.precision):
            return self.model(images.float().contiguous(memory_format=layout)).float()


def _autocast(device: str, precision: str):
    return nullcontext() if precision == "fp32" else torch.autocast(device, dtype=torch.bfloat16)


def probe_precisions(model: nn.Module, image_size: int, batch_size: int, channels_last: bool,
                     repeats: int = 3) -> dict[str, float]:
    """Training images/s of a copy of ``model`` (forward and backward on random images, no update) in fp32 and
    in bf16 autocast on the CPU, in turns, the best of ``repeats`` each."""
    probe = copy.deepcopy(model).train()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=layout)
    best = {"fp32": 0.0, "bf16": 0.0}
    for _ in range(repeats + 1):  # the first round warms both up
        for precision in best:
            start = time.perf_counter()
            with _autocast("cpu", precision):
                loss = probe(images).float().logsumexp(1).mean()
            loss.backward()
            best[precision] = max(best[precision], batch_size / (time.perf_counter() - start))
    return best


def make_task(cfg: FinetuneConfig, classes: list[str], device: str, channels_last: bool) -> Task:
    """The configured backbone from its base weights, its ImageNet head replaced by one for ``classes``
    (initialised from ``cfg.seed``); its precision is chosen by ``choose_precision`` (or a resumed run's)."""
    spec = get_spec(cfg.backbone)
    model, base = build_network(cfg.backbone, cfg.weights, cfg.seed)
    if base.finetuned is not None:
        raise WeightsError(f"{cfg.weights} is itself fine-tuned ({base.finetuned.words()}); fine-tune from "
                           "ImageNet weights or none, so that which cells the result has seen stays one record")
    torch.manual_seed(cfg.seed)
    spec.reset_head(model, len(classes))
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Task(model, spec, base, classes, device, "fp32", channels_last)


def choose_precision(task: Task, cfg: FinetuneConfig, image_size: int) -> None:
    """``finetune.precision``, or for ``auto`` bf16 on a GPU and on a CPU bf16 only where it measured at least
    1.1x fp32's speed on this network."""
    if cfg.precision != "auto":
        task.precision = cfg.precision
    elif task.device == "cuda":
        task.precision = "bf16"
    else:
        task.measured = probe_precisions(task.model, image_size, cfg.batch_size, task.channels_last)
        task.precision = "bf16" if task.measured["bf16"] > 1.1 * task.measured["fp32"] else "fp32"


def loss_function(cfg: FinetuneConfig) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
