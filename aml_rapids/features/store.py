"""The feature store: a plain Zarr v3 group any zarr, xarray or dask.array reader can open.

    features/<backbone>   (rows, dim) float16 (or float32), chunked (chunk_rows, dim)
    rows/<field>          (rows,) cell_id, path, label, patient, cohort, split, sha256, aug_index, fold,
                          augment, status (0 pending, 1 ok, 2 failed, 3 padding)
    progress/chunk_done   (chunks,) bool, one chunk file per store chunk, written after that chunk's data

Every write covers whole chunks and each chunk has one writer, so a run killed at any moment leaves
finished chunks intact and unfinished ones marked not done. Appends start on a new chunk, so the files of
existing chunks are never rewritten.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from ..errors import AmlRapidsError
from .plan import ROW_FIELDS, STATUS_FAILED, STATUS_OK, STATUS_PADDING, STATUS_PENDING

ATTRS_KEY = "aml_rapids"
FORMAT = "aml-rapids feature store"


class StoreError(AmlRapidsError):
    """A store that cannot be used as asked."""


class FeatureStore:
    """A handle on one store; ``create`` lays it out, ``open`` reads an existing one."""

    def __init__(self, group: zarr.Group, path: Path):
        self.group, self.path = group, Path(path)
        meta = dict(group.attrs).get(ATTRS_KEY)
        if not meta or meta.get("format") != FORMAT:
            raise StoreError(f"{path} is a Zarr group but not an aml-rapids feature store")
        self.meta = meta
        self.chunk_rows = int(meta["chunk_rows"])

    @classmethod
    def create(cls, path: Path, rows: pd.DataFrame, dims: dict[str, int], meta: dict) -> "FeatureStore":
        chunk_rows = meta["chunk_rows"]
        if len(rows) % chunk_rows:
            raise StoreError("store rows must fill whole chunks (pad segments first)")
        try:
            group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            raise StoreError(f"{path} already exists") from None
        except OSError as exc:
            raise StoreError(f"cannot create feature store {path}: {exc}") from None
        group.attrs[ATTRS_KEY] = {"format": FORMAT, **meta}
        for name, dim in dims.items():
            group.create_array(f"features/{name}", shape=(len(rows), dim), chunks=(chunk_rows, dim),
                               dtype=meta["store_dtype"], fill_value=np.nan, dimension_names=("row", f"{name}_feature"))
        for field, kind in ROW_FIELDS.items():
            group.create_array(f"rows/{field}", shape=(len(rows),), chunks=(chunk_rows,), dtype=kind,
                               dimension_names=("row",))
        group.create_array("progress/chunk_done", shape=(len(rows) // chunk_rows,), chunks=(1,), dtype=bool,
                           fill_value=False)
        store = cls(group, path)
        store._write_rows(rows, 0)
        return store

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> "FeatureStore":
        if not Path(path).exists():
            raise StoreError(f"feature store {path} does not exist (make one with `aml-rapids extract`)")
        try:
            return cls(zarr.open_group(str(path), mode=mode, zarr_format=3), path)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as exc:
            raise StoreError(f"{path} is not a readable Zarr v3 group: {exc}") from None

    @property
    def n_rows(self) -> int:
        return self.group["rows/status"].shape[0]

    @property
    def n_chunks(self) -> int:
        return self.n_rows // self.chunk_rows

    @property
    def backbones(self) -> list[str]:
        return list(self.meta["backbones"])

    def rows(self) -> pd.DataFrame:
        """Every row's metadata (padding included; filter on ``status``)."""
        return pd.DataFrame({field: self.group[f"rows/{field}"][:] for field in ROW_FIELDS})

    def features(self, backbone: str) -> zarr.Array:
        if f"features/{backbone}" not in self.group:
            raise StoreError(f"store {self.path} has no features for backbone {backbone!r}; it has "
                             f"{', '.join(self.backbones)}")
        return self.group[f"features/{backbone}"]

    def done_chunks(self) -> np.ndarray:
        """Which chunks are complete; a marker that cannot be read counts as not done."""
        marks = self.group["progress/chunk_done"]
        try:
            return np.asarray(marks[:], dtype=bool)
        except Exception:  # a marker half-written when a run was killed; fall back to one by one
            done = np.zeros(marks.shape[0], dtype=bool)
            for k in range(len(done)):
                try:
                    done[k] = bool(marks[k])
                except Exception:
                    done[k] = False
            return done

    def chunk_slice(self, k: int) -> slice:
        return slice(k * self.chunk_rows, (k + 1) * self.chunk_rows)

    def write_chunk(self, k: int, features: dict[str, np.ndarray], status: np.ndarray) -> None:
        """Write one whole chunk of every backbone and its row status, then mark it done."""
        rows = self.chunk_slice(k)
        for name, values in features.items():
            self.group[f"features/{name}"][rows] = values
        self.group["rows/status"][rows] = status
        self.group["progress/chunk_done"][k] = True

    def append(self, rows: pd.DataFrame, manifest_record: dict) -> range:
        """Grow every array by ``rows`` (whole chunks) and write their metadata; returns the new chunk indices."""
        if len(rows) % self.chunk_rows:
            raise StoreError("appended rows must fill whole chunks (pad segments first)")
        start, first_chunk = self.n_rows, self.n_chunks
        for name in self.backbones:
            arr = self.group[f"features/{name}"]
            arr.resize((start + len(rows), arr.shape[1]))
        for field in ROW_FIELDS:
            self.group[f"rows/{field}"].resize((start + len(rows),))
        self.group["progress/chunk_done"].resize((first_chunk + len(rows) // self.chunk_rows,))
        self._write_rows(rows, start)
        self.record_manifest(manifest_record)
        return range(first_chunk, self.n_chunks)

    def record_manifest(self, record: dict) -> None:
        meta = dict(self.group.attrs[ATTRS_KEY])
        meta["manifests"] = [*meta.get("manifests", []), record]
        self.group.attrs[ATTRS_KEY] = meta
        self.meta = meta

    def _write_rows(self, rows: pd.DataFrame, start: int) -> None:
        for field, kind in ROW_FIELDS.items():
            values = rows[field].to_numpy()
            self.group[f"rows/{field}"][start:start + len(rows)] = values.astype(str if kind is str else kind)

    def summary(self) -> dict:
        status = self.group["rows/status"][:]
        return {"rows": int(len(status)), "ok": int((status == STATUS_OK).sum()),
                "failed": int((status == STATUS_FAILED).sum()), "pending": int((status == STATUS_PENDING).sum()),
                "padding": int((status == STATUS_PADDING).sum()), "chunks_done": int(self.done_chunks().sum()),
                "chunks": self.n_chunks}
