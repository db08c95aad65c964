"""CellLoader: iterate a manifest table through the DALI graph, every row exactly once per epoch.

DALI's own iterator (``DALIGenericIterator`` with ``LastBatchPolicy.PARTIAL``) trims the padded last batch.
Files that vanished or changed size since indexing are left out before DALI sees them and listed in
``failures``; the epoch goes on with the rest, labels carried by row position so none can shift.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import nvidia.dali.types as types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ..config import RunConfig, SegmentationConfig
from ..data.inspect import ImageProblem, inspect_image
from ..data.scan import Problem
from ..errors import ConfigError, DataError
from ..provenance import usable_cores
from ..timing import span
from .augment import RowDraws, row_draws
from .pipeline import READER, GraphSpec, Normalization, build_pipeline, output_names
from .stain import LabTarget, lab_target

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
        raise ConfigError("loader.device=gpu, but no CUDA GPU is visible; use loader.device=cpu or auto")
    return "gpu" if requested == "gpu" or (requested == "auto" and has_gpu) else "cpu"


@functools.lru_cache(maxsize=4)
def _reference_target(path: str, segmentation: str, region: str, min_foreground: float, stamp: tuple) -> LabTarget:
    """The reference cell decoded and masked by this very graph (so its foreground is found as every cell's);
    ``segmentation`` is its config as JSON and ``stamp`` the file's size and time, keys of the cache."""
    try:
        info = inspect_image(Path(path), verify_decode=True)
    except ImageProblem as problem:
        raise DataError(f"stain_norm.reference {path}: {problem}") from None
    row = pd.DataFrame([{"cell_id": "reference", "path": os.path.abspath(path), "bytes": info.bytes,
                         "mtime_ns": info.mtime_ns, "sha256": info.sha256}])
    plain = RunConfig(segmentation=SegmentationConfig.model_validate_json(segmentation),
                      loader={"device": "cpu", "batch_size": 1})
    batch = next(iter(CellLoader(row, Path("/"), plain, debug=True)))
    rgb, mask = (batch.views[k][0].cpu().numpy() for k in ("decoded", "mask"))
    return lab_target(rgb, mask[..., 0].astype(bool), region, Path(path), info.sha256, min_foreground)


def stain_target(cfg: RunConfig) -> LabTarget | None:
    """The Lab statistics every cell is normalised to, or None without stain normalisation."""
    norm = cfg.stain_norm
    if norm.method == "none":
        return None
    try:
        stat = os.stat(norm.reference)
    except OSError as exc:
        raise DataError(f"stain_norm.reference {norm.reference}: cannot be read ({exc.strerror})") from None
    return _reference_target(norm.reference, cfg.segmentation.model_dump_json(), norm.region, norm.min_foreground,
                             (stat.st_size, stat.st_mtime_ns))


class CellLoader:
    """Batches of preprocessed cells from ``table`` (manifest rows, optionally oversampled with ``aug_index``).

    ``augment`` turns on the training-time warp; validation and test loaders leave it off. ``epoch`` (when
    fine-tuning) gives every epoch its own augmentations; batches come in table order, so a training loader is
    given the epoch's shuffled table.
    """

    def __init__(self, table: pd.DataFrame, root: Path, cfg: RunConfig, augment: bool = False,
                 normalizations: dict[str, Normalization] | None = None, shard_id: int = 0, num_shards: int = 1,
                 debug: bool = False, epoch: int | None = None):
        self.table = table.reset_index(drop=True)
        self.root = Path(root)
        self.cfg = cfg
        self.device = resolve_device(cfg.loader.device)
        self.shard_id, self.num_shards = shard_id, num_shards
        self.augment = augment and cfg.augment.enabled
        self.epoch = epoch
        self.spec = GraphSpec(
            image_size=cfg.loader.image_size, segmentation=cfg.segmentation, normalizations=normalizations or {"imagenet": Normalization()},
            gpu=self.device == "gpu", output_dtype=GPU_DTYPES[cfg.loader.gpu_dtype] if self.device == "gpu"
            else types.FLOAT, gpu_decode=cfg.loader.gpu_decode, debug=debug, stain_target=stain_target(cfg))
        self.failures: list[Problem] = []
        self.startup: dict[str, float] = {}  # the latest epoch's seconds before its first batch, by part
        root = str(self.root)
        self._files = [os.path.join(root, p) for p in self.table["path"]]
        self._mine = np.arange(len(self.table))[shard_id::num_shards]

    def __len__(self) -> int:
        return len(self._mine)

    def _draws(self, positions: np.ndarray) -> RowDraws | None:
        cfg = self.cfg.loader
        return (row_draws(self.table.iloc[positions], self.cfg.augment, cfg.seed, cfg.image_size, self.epoch)
                if self.augment else None)

    def _pipeline(self, positions: np.ndarray, draws: RowDraws | None):
        cfg = self.cfg.loader
        return build_pipeline(
            [self._files[i] for i in positions], positions.tolist(), self.spec, draws, batch_size=cfg.batch_size,
            num_threads=cfg.num_threads or usable_cores(), device_id=0 if self.device == "gpu" else None,
            prefetch=cfg.prefetch)

    def _precheck(self, positions: np.ndarray) -> np.ndarray:
        """Drop rows whose file is gone or changed since indexing, recording why: DALI's decoders fail on such
        files in a way a process cannot always survive (see docs/loader.md). A file of the indexed size but
        modified since is hashed: its content must still be the indexed one."""
        keep = []
        sizes = self.table["bytes"].to_numpy()
        modified = (self.table["mtime_ns"].to_numpy() if "mtime_ns" in self.table else
                    np.full(len(self.table), -1))  # manifests from before 0.4: size alone
        for pos in positions:
            path, expected = self._files[pos], sizes[pos]
            try:
                stat = os.stat(path)
            except OSError as exc:
                self.failures.append(Problem(path, f"unreadable since indexing: {exc.strerror}"))
                continue
            if stat.st_size != expected:
                self.failures.append(Problem(path, f"changed since indexing: {stat.st_size} bytes, manifest says "
                                                   f"{expected}; re-run `aml-rapids index`"))
                continue
            if modified[pos] >= 0 and stat.st_mtime_ns != modified[pos]:
                problem = self._content_changed(pos)
                if problem:
                    self.failures.append(Problem(path, problem))
                    continue
            keep.append(pos)
        return np.asarray(keep, dtype=np.int64)

    def _content_changed(self, pos: int) -> str | None:
        """Why a file modified since indexing can no longer be used, or None when its content is the indexed one."""
        try:
            now = inspect_image(Path(self._files[pos]), verify_decode=False).sha256
        except ImageProblem as problem:
            return f"modified since indexing and now unusable: {problem}; re-run `aml-rapids index`"
        if now != self.table["sha256"].iat[pos]:
            return "modified since indexing: content differs from the indexed file; re-run `aml-rapids index`"
        return None

    def _name_undecodable(self, pending: np.ndarray, exc: Exception) -> DataError:
        """DALI's error does not name the file: decode the rows in flight to find it."""
        window = self.cfg.loader.batch_size * (self.cfg.loader.prefetch + 2)
        bad = []
        for pos in pending[:window]:
            try:
                inspect_image(Path(self._files[pos]), verify_decode=True)
            except ImageProblem as problem:
                bad.append(f"{self._files[pos]} ({problem})")
        named = "; ".join(bad) or "no file in flight fails a PIL decode"
        return DataError(f"decoding failed although sizes match the manifest, so content changed since "
                              f"indexing: {named}. Re-run `aml-rapids index`. DALI said: {exc}")

    def __iter__(self) -> Iterator[Batch]:
        names = output_names(self.spec)
        image_keys = [n for n in names if n.startswith("image_")]
        self.startup = {}
        with span(self.startup, "file checks"):
            pending = self._precheck(self._mine)
        if not len(pending):
            return
        with span(self.startup, "augmentation draws"):
            draws = self._draws(pending)
        with span(self.startup, "pipeline build"):
            pipe = self._pipeline(pending, draws)
        with span(self.startup, "first batch"):  # DALI's iterator runs the pipeline up to its first batch
            iterator = DALIGenericIterator(pipe, names, reader_name=READER, auto_reset=False,
                                           last_batch_policy=LastBatchPolicy.PARTIAL)
        delivered = 0
        try:
            for (out,) in iterator:
                positions = out["position"].reshape(-1).cpu().numpy().astype(np.int64)
                delivered += len(positions)
                images = {k.removeprefix("image_"): self._cast(out[k]) for k in image_keys}
                views = {k: out[k] for k in names[len(image_keys) + 1:]}
                yield Batch(images, positions, views)
        except RuntimeError as exc:
            raise self._name_undecodable(pending[delivered:], exc) from exc

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device == "gpu" and self.cfg.loader.gpu_dtype == "bf16":
            return tensor.to(torch.bfloat16)
        return tensor
