"""The parity guard: an engine and precision is used only if its features of the calibration cells agree with
PyTorch fp32's, row by row. The thresholds are per precision (docs/engines.md says how they were set); the
worst row decides, since one cell mapped elsewhere is one cell classified on other features."""

from __future__ import annotations

import torch

from .base import Choice, ParityError

MIN_COSINE = {"fp32": 0.9999, "bf16": 0.999, "fp16": 0.999, "int8": 0.98, "fp8": 0.98}


def cosine_rows(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row pair, in float64; two all-zero rows agree (a ReLU feature layer may give
    them), a zero row against a non-zero one does not."""
    a, b = reference.double().cpu(), candidate.double().cpu()
    if a.shape != b.shape:
        raise ParityError(f"the engine gave features of shape {tuple(b.shape)}, PyTorch {tuple(a.shape)}")
    dot, norms = (a * b).sum(dim=1), a.norm(dim=1) * b.norm(dim=1)
    both_zero = (a.norm(dim=1) == 0) & (b.norm(dim=1) == 0)
    cosine = torch.where(norms > 0, dot / norms.clamp_min(1e-300), torch.zeros_like(dot))
    cosine[both_zero] = 1.0
    return torch.nan_to_num(cosine, nan=-1.0)  # a NaN feature agrees with nothing


def check(backbone: str, choice: Choice, reference: torch.Tensor, candidate: torch.Tensor, advice: str = "",
          threshold: float | None = None) -> dict:
    """The agreement of ``candidate`` with ``reference`` (PyTorch fp32 on the same images); ParityError, with
    the measured similarity and ``advice``, when its worst row is below ``threshold`` (default: the
    precision's)."""
    cosine = cosine_rows(reference, candidate)
    threshold = MIN_COSINE[choice.precision] if threshold is None else threshold
    measured = {"min_cosine": float(cosine.min()), "median_cosine": float(cosine.median()),
                "cells": len(cosine), "threshold": threshold}
    if measured["min_cosine"] < threshold:
        raise ParityError(
            f"{choice} features of {backbone} agree with PyTorch fp32 at cosine {measured['min_cosine']:.5f} on "
            f"the worst of {len(cosine)} cells (median {measured['median_cosine']:.5f}); {choice.precision} needs "
            f"{threshold}" + (f". {advice}" if advice else ""))
    return measured
