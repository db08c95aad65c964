"""The feature store: a plain Zarr v3 group any zarr, xarray or dask.array reader can open, and which says what
it holds (docs/reading-a-store.md).

    features/<backbone>   (rows, dim) float16 (or float32), chunked (chunk_rows, dim); a name with ":" or "/" (a
                          timm model) has each run of other characters than A-Z a-z 0-9 . _ - as "-" and the
                          first 8 hex digits of the name's sha256 appended (timm:test_vit: timm-test_vit-<hash>)
    rows/<field>          (rows,) cell_id, path, label, patient, cohort, split, sha256, pixels_sha256, aug_index,
                          fold, augment, status (0 pending, 1 ok, 2 failed, 3 padding)
    progress/chunk_done   (chunks,) bool, one chunk file per store chunk, written after that chunk's data

Every array names its dimensions (``row``, ``<backbone>_feature``, ``chunk``) and says what it holds in its
``long_name`` attribute; rows/status names its codes in CF's ``flag_values`` and ``flag_meanings``, the root
attributes (``aml_rapids``) in ``status_codes``. Padding rows have every text field empty, their split too. The
root zarr.json holds every array's metadata once more (consolidated metadata), so xarray opens the store in one
read; it is written at the end of creation and of every append, the only steps that change array metadata.
aml-rapids itself reads each array's own metadata (``use_consolidated=False``).

Every write covers whole chunks and each chunk has one writer, so a run killed at any moment leaves
finished chunks intact and unfinished ones marked not done. Appends start on a new chunk, so the files of
existing chunks are never rewritten.

The steps that touch many files are all-or-nothing. A store is laid out in ``<store>.partial`` and renamed into
place, so a kill or a full disk while it is made leaves no store. An append first writes a journal (every
metadata file as it was, the root zarr.json with its consolidated copy among them) and deletes it when done; a
writer that finds a journal restores those files and removes the chunks past the old end before it goes on, and
a reader refuses the store until then. zarr writes each file atomically (since 3.1.3), so no metadata file is
ever half-written. Callers hold the store's lock (``lock.StoreLock``) around every write.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from ..errors import ConfigError, DataError, OutputError
from ..outputs import atomic_write_text, slug
from .plan import (OPTIONAL_ROW_FIELDS, ROW_DEFAULTS, ROW_FIELDS, ROW_LONG_NAMES, STATUS_FAILED, STATUS_NAMES, STATUS_OK,
                   STATUS_PADDING, STATUS_PENDING)

ATTRS_KEY = "aml_rapids"
FORMAT = "aml-rapids feature store"
JOURNAL = "aml_rapids-append-journal.json"
STATUS_CODES = {str(code): name for code, name in STATUS_NAMES.items()}  # as the root attributes hold it (JSON)
# Each row array's attributes: what it holds, and for rows/status the meaning of each code in CF's flag
# attributes, which xarray keeps and CF tools read.
ROW_ATTRIBUTES = {field: {"long_name": ROW_LONG_NAMES[field]} for field in ROW_FIELDS}
ROW_ATTRIBUTES["status"].update(flag_values=list(STATUS_NAMES), flag_meanings=" ".join(STATUS_NAMES.values()))


class StoreError(DataError):
    """A store that cannot be used as asked (missing, damaged, or not a feature store)."""


class StoreMismatch(ConfigError):
    """A store made with another configuration or split than the one asked for."""


def feature_identity(identity: dict, backbones: list[str] | None = None) -> dict:
    """The part of a store's identity (``extract.store_identity``) that decides an un-augmented row's features,
    for the chosen backbones (networks, weights by content, image size, segmentation, dtype): what a model's
    features and the features it is later given must share. A backbone the identity lacks raises KeyError."""
    nets = identity["backbones"]
    chosen = {b: {k: nets[b][k] for k in ("dim", "sha256", "pretrained")} for b in (backbones or nets)}
    preprocess = identity["preprocess"]
    return {"backbones": chosen, "features_seed": identity["features_seed"],
            "store_dtype": identity["store_dtype"], "image_size": preprocess["image_size"],
            "segmentation": preprocess["segmentation"],
            **({"stain_norm": preprocess["stain_norm"]} if "stain_norm" in preprocess else {})}


def identity_differences(have: dict, want: dict, prefix: str = "") -> list[str]:
    """The keys (``section.key.key``, down to the values that differ) in which two identities differ."""
    out = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if a != b:
            nested = isinstance(a, dict) and isinstance(b, dict)
            out += identity_differences(a, b, f"{prefix}{key}.") if nested else [f"{prefix}{key}"]
    return out


def _consolidate(path: Path) -> None:
    """Write every group's and array's metadata into the root zarr.json (consolidated metadata), which xarray
    opens the store by, in one read and without a warning. Creation and append end with it; nothing else
    changes array metadata (chunk writes touch none)."""
    quiet = ("Consolidated metadata is currently not part",  # of the Zarr v3 spec: true, and no help to a user
             f"Object at {JOURNAL} is not recognized")  # an append's journal, in the store while it runs
    with warnings.catch_warnings():
        for message in quiet:
            warnings.filterwarnings("ignore", message, UserWarning)
        zarr.consolidate_metadata(str(path), zarr_format=3)


def partial_path(path: Path) -> Path:
    """Where a store is laid out before it is renamed into place."""
    return Path(path).with_name(Path(path).name + ".partial")


class FeatureStore:
    """A handle on one store; ``create`` lays it out, ``open`` reads an existing one."""

    def __init__(self, group: zarr.Group, path: Path):
        self.group, self.path = group, Path(path)
        meta = dict(group.attrs).get(ATTRS_KEY)
        if not meta or meta.get("format") != FORMAT:
            raise StoreError(f"{path} is a Zarr group but not an aml-rapids feature store")
        self.meta = meta
        self.chunk_rows = int(meta["chunk_rows"])
        self.fields = [f for f in ROW_FIELDS if f not in OPTIONAL_ROW_FIELDS or f"rows/{f}" in group]
        missing = [a for a in self._arrays() if a not in group]
        if missing:
            raise StoreError(f"feature store {path} is damaged: {', '.join(missing)} missing; extract into a new "
                             "store")

    @classmethod
    def create(cls, path: Path, rows: pd.DataFrame, dims: dict[str, int], meta: dict) -> "FeatureStore":
        """Lay the store out in ``<path>.partial`` (removing one left by an interrupted creation), then rename it
        to ``path``."""
        path, chunk_rows = Path(path), meta["chunk_rows"]
        if len(rows) % chunk_rows:
            raise StoreError("store rows must fill whole chunks (pad segments first)")
        if path.exists():
            raise StoreError(f"{path} already exists")
        partial = partial_path(path)
        try:
            shutil.rmtree(partial, ignore_errors=True)
            cls._lay_out(partial, rows, dims, meta)
            os.rename(partial, path)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise OutputError(f"cannot create feature store {path}: {exc.strerror or exc}") from None
        return cls.open(path, mode="r+")

    @classmethod
    def _lay_out(cls, path: Path, rows: pd.DataFrame, dims: dict[str, int], meta: dict) -> None:
        chunk_rows = meta["chunk_rows"]
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        group.attrs[ATTRS_KEY] = {"format": FORMAT, "status_codes": STATUS_CODES, **meta}
        for name, dim in dims.items():
            group.create_array(f"features/{slug(name)}", shape=(len(rows), dim), chunks=(chunk_rows, dim),
                               dtype=meta["store_dtype"], fill_value=np.nan, dimension_names=("row", f"{name}_feature"),
                               attributes={"long_name": f"{name} features of each row (NaN unless its status is ok)"})
        for field, kind in ROW_FIELDS.items():
            group.create_array(f"rows/{field}", shape=(len(rows),), chunks=(chunk_rows,), dtype=kind,
                               dimension_names=("row",), attributes=ROW_ATTRIBUTES[field])
        group.create_array("progress/chunk_done", shape=(len(rows) // chunk_rows,), chunks=(1,), dtype=bool,
                           fill_value=False, dimension_names=("chunk",),
                           attributes={"long_name": f"whether each chunk of {chunk_rows} rows is written"})
        cls(group, path)._write_rows(rows, 0)
        _consolidate(path)

    @classmethod
    def open(cls, path: Path, mode: str = "r", sweep: bool = True) -> "FeatureStore":
        """Open for reading (``r``) or, holding the store's lock, for writing (``r+``: an interrupted append is
        rolled back first, and files zarr left half-written are removed, unless ``sweep`` is False: a Dask
        worker's, while the other workers of its job write theirs)."""
        path = Path(path)
        if not path.exists():
            raise StoreError(f"feature store {path} does not exist (make one with `aml-rapids extract`)")
        if (path / JOURNAL).exists():
            if mode == "r":
                raise StoreError(f"an append to feature store {path} did not finish (it was interrupted, or is "
                                 "running now); run `aml-rapids extract` on it again to roll it back and complete it")
            cls._roll_back(path)
        try:
            # each array's own metadata, never the consolidated copy, which lags it while an append runs
            store = cls(zarr.open_group(str(path), mode=mode, zarr_format=3, use_consolidated=False), path)
        except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError, ValueError, KeyError) as exc:
            raise StoreError(f"{path} is not a readable Zarr v3 group: {exc}") from None
        if mode != "r" and sweep:
            for leftover in path.rglob("*.partial"):  # a file zarr was writing when a run was killed
                leftover.unlink()
        return store

    @property
    def n_rows(self) -> int:
        return self.group["rows/status"].shape[0]

    @property
    def n_chunks(self) -> int:
        return self.n_rows // self.chunk_rows

    @property
    def backbones(self) -> list[str]:
        return list(self.meta["backbones"])

    def read(self, array: str, selection=slice(None)) -> np.ndarray:
        """``array[selection]`` (e.g. ``rows/status``); a missing or damaged array or chunk is a StoreError
        naming it, not a codec's traceback."""
        try:
            return self.group[array][selection]
        except Exception as exc:  # KeyError for a lost zarr.json, codec errors for a damaged chunk, OSError
            raise StoreError(f"feature store {self.path} is damaged: cannot read {array} ({type(exc).__name__}: "
                             f"{exc}); extract into a new store") from None

    def rows(self) -> pd.DataFrame:
        """Every row's metadata (padding included; filter on ``status``)."""
        rows = pd.DataFrame({field: self.read(f"rows/{field}") for field in self.fields})
        return rows.assign(**{f: ROW_DEFAULTS[f] for f in ROW_FIELDS if f not in self.fields})[list(ROW_FIELDS)]

    def features(self, backbone: str) -> zarr.Array:
        if backbone not in self.backbones:
            raise StoreError(f"store {self.path} has no features for backbone {backbone!r}; it has "
                             f"{', '.join(self.backbones)}")
        return self.group[f"features/{slug(backbone)}"]

    def done_chunks(self, chunks: list[int] | None = None) -> np.ndarray:
        """Which chunks (all, or those listed) are complete; a marker that cannot be read counts as not done."""
        marks = self.group["progress/chunk_done"]
        chosen = range(marks.shape[0]) if chunks is None else chunks
        try:
            return np.asarray(marks[:] if chunks is None else marks.get_coordinate_selection(list(chunks)), dtype=bool)
        except Exception:  # a marker half-written when a run was killed; fall back to one by one
            done = np.zeros(len(chosen), dtype=bool)
            for i, k in enumerate(chosen):
                try:
                    done[i] = bool(marks[k])
                except Exception:
                    done[i] = False
            return done

    def lost_chunks(self, status: np.ndarray, done: np.ndarray) -> np.ndarray:
        """Of the chunks marked ``done``, those whose files are gone (deleted by hand, lost on a failing disk):
        zarr would read them as fill values without a word. A done chunk always has a status file; it has
        feature files where it holds a usable row (zarr skips chunks that are all fill value, as all-failed
        rows are)."""
        ok = (status == STATUS_OK).reshape(-1, self.chunk_rows).any(axis=1)
        arrays = {a: self.group[a].metadata for a in ["rows/status", *(f"features/{slug(b)}" for b in self.backbones)]}
        lost = np.zeros(len(done), dtype=bool)
        for k in np.flatnonzero(done):
            needed = [("rows/status", (k,))] + [(f"features/{slug(b)}", (k, 0)) for b in self.backbones if ok[k]]
            lost[k] = not all((self.path / a / arrays[a].encode_chunk_key(c)).is_file() for a, c in needed)
        return lost

    def chunk_slice(self, k: int) -> slice:
        return slice(k * self.chunk_rows, (k + 1) * self.chunk_rows)

    def write_chunk(self, k: int, features: dict[str, np.ndarray], status: np.ndarray) -> None:
        """Write one whole chunk of every backbone and its row status, then mark it done."""
        rows = self.chunk_slice(k)
        for name, values in features.items():
            self.group[f"features/{slug(name)}"][rows] = values
        self.group["rows/status"][rows] = status
        self.group["progress/chunk_done"][k] = True

    def mark_pending(self, chunks: list[int]) -> None:
        """Clear the done-markers of ``chunks`` (marked chunks that are to be computed again: lost files, rows
        that failed), so that a worker of a Dask job, retrying a unit another worker died in, computes exactly
        the unit's chunks that are not yet done."""
        marks = self.group["progress/chunk_done"]
        for k in chunks:
            marks[k] = False

    def _arrays(self) -> list[str]:
        return [*(f"features/{slug(n)}" for n in self.backbones), *(f"rows/{f}" for f in self.fields), "progress/chunk_done"]

    def append(self, rows: pd.DataFrame, manifest_record: dict) -> range:
        """Grow every array by ``rows`` (whole chunks) and write their metadata, journalled; returns the new
        chunk indices."""
        if len(rows) % self.chunk_rows:
            raise StoreError("appended rows must fill whole chunks (pad segments first)")
        start, first_chunk = self.n_rows, self.n_chunks
        metadata = ["zarr.json", "features/zarr.json", "rows/zarr.json", "progress/zarr.json",
                    *(f"{a}/zarr.json" for a in self._arrays())]
        atomic_write_text(self.path / JOURNAL, json.dumps(
            {"chunks": first_chunk, "arrays": self._arrays(),
             "metadata": {m: (self.path / m).read_text() for m in metadata}}))
        try:
            for name in self.backbones:
                arr = self.group[f"features/{slug(name)}"]
                arr.resize((start + len(rows), arr.shape[1]))
            for field in self.fields:
                self.group[f"rows/{field}"].resize((start + len(rows),))
            self.group["progress/chunk_done"].resize((first_chunk + len(rows) // self.chunk_rows,))
            self._write_rows(rows, start)
            self._record_manifest(manifest_record)
            _consolidate(self.path)
        except OSError as exc:
            try:
                self._roll_back(self.path)
            except (OSError, OutputError):
                pass  # the journal stays; the next writer rolls back
            raise OutputError(f"cannot append to feature store {self.path}: {exc.strerror or exc}") from None
        (self.path / JOURNAL).unlink()
        return range(first_chunk, self.n_chunks)

    @staticmethod
    def _roll_back(path: Path) -> None:
        """Undo an unfinished append: every metadata file as the journal holds it, chunks past the old end gone."""
        try:
            journal = json.loads((path / JOURNAL).read_text())
        except ValueError as exc:
            raise StoreError(f"{path / JOURNAL} is damaged ({exc}); the store cannot be recovered") from None
        for name, text in journal["metadata"].items():
            atomic_write_text(path / name, text)
        for array in journal["arrays"]:
            chunks = path / array / "c"
            for entry in chunks.iterdir() if chunks.is_dir() else ():
                if entry.name.isdigit() and int(entry.name) >= journal["chunks"]:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        (path / JOURNAL).unlink()

    def _record_manifest(self, record: dict) -> None:
        """Add a manifest to the root attributes, as part of an append (journalled, consolidated after): the root
        zarr.json is rewritten from this handle's metadata, opened without the consolidated copy, so the copy is
        gone from it until ``_consolidate`` writes it again."""
        meta = dict(self.group.attrs[ATTRS_KEY])
        meta["manifests"] = [*meta.get("manifests", []), record]
        self.group.attrs[ATTRS_KEY] = meta
        self.meta = meta

    def _write_rows(self, rows: pd.DataFrame, start: int) -> None:
        for field in self.fields:
            kind, values = ROW_FIELDS[field], rows[field].to_numpy()
            self.group[f"rows/{field}"][start:start + len(rows)] = values.astype(str if kind is str else kind)

    def summary(self) -> dict:
        status = self.read("rows/status")
        return {"rows": int(len(status)), "ok": int((status == STATUS_OK).sum()),
                "failed": int((status == STATUS_FAILED).sum()), "pending": int((status == STATUS_PENDING).sum()),
                "padding": int((status == STATUS_PADDING).sum()), "chunks_done": int(self.done_chunks().sum()),
                "chunks": self.n_chunks}


def open_store(path: Path) -> FeatureStore:
    """A feature store, for reading (``FeatureStore.open``): ``rows()``, ``features(backbone)``, ``summary()``."""
    return FeatureStore.open(path)
