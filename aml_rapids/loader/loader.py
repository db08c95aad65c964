"""CellLoader: iterate a manifest table through the DALI graph, every row exactly once per epoch.

DALI's own iterator (``DALIGenericIterator`` with ``LastBatchPolicy.PARTIAL``) trims the padded last batch.
A file that fails to decode mid-run stops a DALI pipeline; the loader then checks the rows not yet delivered,
records the bad files with their reason, and rebuilds the pipeline on the rest, so the epoch goes on with
correct labels and nothing delivered twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import nvidia.dali.types as types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ..config import RunConfig
from ..data.inspect import ImageProblem, inspect_image
from ..data.scan import Problem
from ..errors import AmlRapidsError
from .pipeline import READER, GraphSpec, Normalization, build_pipeline, output_names

GPU_DTYPES = {"fp16": types.FLOAT16, "bf16": types.FLOAT16, "fp32": types.FLOAT}


@dataclass
class Batch:
    """Normalised images per normalisation name (NCHW), and the table positions they came from."""

    images: dict[str, torch.Tensor]
    positions: np.ndarray
    views: dict[str, torch.Tensor] = field(default_factory=dict)


def resolve_device(requested: str) -> str:
    """``auto`` picks the GPU when torch sees one; asking for ``gpu`` without one is an error, not a fallback."""
    has_gpu = torch.cuda.is_available()
    if requested == "gpu" and not has_gpu:
        raise AmlRapidsError("loader.device=gpu, but no CUDA GPU is visible; use loader.device=cpu or auto")
    return "gpu" if requested == "gpu" or (requested == "auto" and has_gpu) else "cpu"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CellLoader:
    """Batches of preprocessed cells from ``table`` (manifest rows, optionally oversampled with ``aug_index``).

    ``augment`` turns on the training-time warp; validation and test loaders leave it off.
    """

    def __init__(self, table: pd.DataFrame, root: Path, cfg: RunConfig, augment: bool = False,
                 normalizations: dict[str, Normalization] | None = None, shard_id: int = 0, num_shards: int = 1,
                 debug: bool = False):
        self.table = table.reset_index(drop=True)
        self.root = Path(root)
        self.cfg = cfg
        self.device = resolve_device(cfg.loader.device)
        self.shard_id, self.num_shards = shard_id, num_shards
        self.spec = GraphSpec(
            image_size=cfg.loader.image_size, segmentation=cfg.segmentation,
            augment=cfg.augment if augment else None, normalizations=normalizations or {"imagenet": Normalization()},
            gpu=self.device == "gpu", output_dtype=GPU_DTYPES[cfg.loader.gpu_dtype] if self.device == "gpu"
            else types.FLOAT, debug=debug)
        self.failures: list[Problem] = []
        self._files = [str(self.root / p) for p in self.table["path"]]
        self._mine = np.arange(len(self.table))[shard_id::num_shards]

    def __len__(self) -> int:
        return len(self._mine)

    def _pipeline(self, positions: np.ndarray, attempt: int):
        cfg = self.cfg.loader
        return build_pipeline(
            [self._files[i] for i in positions], positions.tolist(), self.spec, batch_size=cfg.batch_size,
            num_threads=cfg.num_threads or usable_cores(), device_id=0 if self.device == "gpu" else None,
            seed=cfg.seed + attempt, prefetch=cfg.prefetch)

    def _find_bad(self, pending: np.ndarray) -> set[int]:
        """Decode the undelivered rows (the ones in flight first) and record those that fail."""
        window = self.cfg.loader.batch_size * (self.cfg.loader.prefetch + 2)
        for candidates in (pending[:window], pending[window:]):
            bad = set()
            for pos in candidates:
                try:
                    inspect_image(Path(self._files[pos]), verify_decode=True)
                except ImageProblem as exc:
                    bad.add(int(pos))
                    self.failures.append(Problem(self._files[pos], f"failed to decode during loading: {exc}"))
            if bad:
                return bad
        return set()

    def __iter__(self) -> Iterator[Batch]:
        names = output_names(self.spec)
        image_keys = [n for n in names if n.startswith("image_")]
        pending = self._mine.copy()
        attempt = 0
        while len(pending):
            pipe = self._pipeline(pending, attempt)
            iterator = DALIGenericIterator(pipe, names, reader_name=READER, auto_reset=False,
                                           last_batch_policy=LastBatchPolicy.PARTIAL)
            delivered: list[np.ndarray] = []
            try:
                for (out,) in iterator:
                    positions = out["position"].reshape(-1).cpu().numpy().astype(np.int64)
                    delivered.append(positions)
                    images = {k.removeprefix("image_"): self._cast(out[k]) for k in image_keys}
                    views = {k: out[k] for k in names[len(image_keys) + 1:]}
                    yield Batch(images, positions, views)
                return
            except RuntimeError as exc:
                done = np.concatenate(delivered) if delivered else np.empty(0, np.int64)
                pending = np.setdiff1d(pending, done, assume_unique=True)
                bad = self._find_bad(pending)
                if not bad:
                    raise AmlRapidsError(f"DALI pipeline failed and no unreadable file explains it: {exc}") from exc
                pending = np.array([p for p in pending if p not in bad], dtype=np.int64)
                attempt += 1
            finally:
                del iterator, pipe

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device == "gpu" and self.cfg.loader.gpu_dtype == "bf16":
            return tensor.to(torch.bfloat16)
        return tensor
