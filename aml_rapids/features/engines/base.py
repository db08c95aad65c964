"""What every engine shares: the names a config may give, the runner surface, and the errors a user can act on.

A runner maps a batch of preprocessed images (N, 3, S, S, float32, as the loader hands them) to features
(N, dim), whatever runs underneath; extraction, prediction and the occlusion maps call it and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import get_args

import torch

from ...config import Engine, Precision
from ...errors import EngineError

ENGINES = tuple(e for e in get_args(Engine) if e != "auto")
PRECISIONS = tuple(p for p in get_args(Precision) if p != "auto")
EXTRA = {"openvino": "openvino (and nncf for int8): pip install 'aml-rapids[engines]'",
         "onnxruntime": "onnxruntime (onnxruntime-gpu on a GPU): pip install 'aml-rapids[engines]'",
         "tensorrt": "torch-tensorrt, matching the installed torch: pip install torch-tensorrt"}


class EngineUnavailable(EngineError):
    """An engine or precision this machine cannot run: not installed, or not on this device."""


class ParityError(EngineError):
    """An engine whose features do not agree with PyTorch fp32 closely enough to be used."""


@dataclass(frozen=True)
class Choice:
    engine: str
    precision: str

    def __str__(self) -> str:
        return f"{self.engine} {self.precision}"


@dataclass
class Runner:
    """One backbone on one engine: images -> features. ``channels_last``: the layout it wants its input in
    (torch's networks are laid out so; the other engines read plain NCHW). ``batch_size``: the one batch size
    it takes (a short batch is padded up to it), or None for any."""

    choice: Choice
    forward: Callable[[torch.Tensor], torch.Tensor]
    channels_last: bool = False
    batch_size: int | None = None
    artefact: str | None = None  # the cached converted model it runs, if any
    measured: dict = field(default_factory=dict)  # parity and speed on the calibration cells

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images)


def padded(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """A short batch filled up with zero images to ``size`` rows (None: as it is)."""
    if size is None or len(images) >= size:
        return images
    return torch.cat([images, images.new_zeros((size - len(images), *images.shape[1:]))])
