"""The manifest: one row per usable cell image, the table every later stage reads.

Columns: cell_id (stable: hash of cohort and relative path), path (relative to the root kept in the
Parquet metadata), label, patient, cohort, bytes, sha256, mtime_ns, width, height, mode, format, any extra CSV
columns, and, once split, ``split`` or ``fold``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import IndexConfig
from ..errors import DataError
from ..outputs import atomic_write
from .inspect import ImageProblem, inspect_image
from .scan import Candidate, NoUsableImages, Problem, ScanResult, printable, scan_csv, scan_folder

META_KEY = b"aml_rapids"
CORE_COLUMNS = ["cell_id", "path", "label", "patient", "cohort", "bytes", "sha256", "pixels_sha256", "mtime_ns",
                "width", "height", "mode", "format"]
INTEGER_COLUMNS = ("bytes", "mtime_ns", "width", "height")
# manifests made before 0.4 lack mtime_ns (their files are checked by size alone), before 0.5 pixels_sha256
OPTIONAL_COLUMNS = {"mtime_ns", "pixels_sha256"}


@dataclass
class Manifest:
    """A manifest table with the root its relative paths start from and the history of what made it."""

    table: pd.DataFrame
    root: Path
    meta: dict = field(default_factory=dict)

    def paths(self) -> list[Path]:
        """Absolute path of every row, in row order."""
        return [self.root / p for p in self.table["path"]]

    def digest(self) -> str:
        """A hash of the rows' identities and contents: two manifests with the same digest list the same cells."""
        h = hashlib.sha256()
        for cell_id, sha, label in zip(self.table["cell_id"], self.table["sha256"], self.table["label"]):
            h.update(f"{cell_id}:{sha}:{label}\n".encode())
        return h.hexdigest()


@dataclass
class IndexResult:
    manifest: Manifest
    problems: list[Problem]
    layout: str
    found: int
    same_class_duplicates: int
    outside_root: list[str] = field(default_factory=list)  # accepted, with a warning: files outside the root
    warnings: list[str] = field(default_factory=list)  # what the user should know about the rows kept


def cell_id(cohort: str, rel: str) -> str:
    """Stable id of a cell: the same file in the same cohort keeps its id across re-indexing."""
    return hashlib.sha1(f"{cohort}/{rel}".encode()).hexdigest()[:16]


def same_content(table: pd.DataFrame, hashes: frozenset[str] | set[str]) -> pd.Series:
    """Which rows are cells whose file (sha256) or decoded pixels (pixels_sha256, where indexed) are among
    ``hashes``: the one rule by which a copy of a cell under another name counts as that cell."""
    pixels = table["pixels_sha256"].fillna("") if "pixels_sha256" in table else pd.Series("", index=table.index)
    return table["sha256"].isin(hashes) | (pixels.isin(hashes) & (pixels != ""))


def _inspect_all(candidates: list[Candidate], cfg: IndexConfig, progress: Callable[[int], None] | None):
    def work(c: Candidate):
        try:
            return inspect_image(c.path, cfg.verify_decode)
        except ImageProblem as exc:
            return str(exc)
        except Exception as exc:  # whatever one file does, it is that file's problem, not the index's
            return f"cannot be read ({type(exc).__name__}: {exc})"

    with ThreadPoolExecutor(cfg.workers) as pool:
        for result in pool.map(work, candidates, chunksize=32):
            if progress:
                progress(1)
            yield result


def _reject_label_conflicts(table: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[Problem]]:
    """Identical content under two classes cannot be labelled; every copy is rejected and named."""
    labels_per_hash = table.groupby("sha256")["label"].nunique()
    conflicted = set(labels_per_hash[labels_per_hash > 1].index)
    problems = []
    for sha, rows in table[table["sha256"].isin(conflicted)].groupby("sha256"):
        copies = ", ".join(f"{p} ({lab})" for p, lab in zip(rows["path"], rows["label"]))
        for path in rows["path"]:
            problems.append(Problem(str(root / path), f"same content under two classes: {copies}"))
    return table[~table["sha256"].isin(conflicted)].reset_index(drop=True), problems


def _patients_in_several_classes(table: pd.DataFrame) -> list[str]:
    """A patient whose cells carry two labels: one person with cells of two types, or two people who share a
    folder name (``patient_1`` under every class folder), which only the user can tell apart."""
    labels = table.dropna(subset=["patient"]).groupby(["cohort", "patient"])["label"].unique()
    several = labels[labels.map(len) > 1]
    if several.empty:
        return []
    (cohort, patient), example = several.index[0], ", ".join(map(str, several.iloc[0]))
    return [f"{len(several):,} patients have cells under more than one class (e.g. {patient} of cohort {cohort}: "
            f"{example}); each is taken as one patient, kept whole by patient-grouped splits and averaged in "
            "patient-level results. If they are different people, give them distinct names"]


def _cohorts_left_blank(candidates: list[Candidate], cfg: IndexConfig, default: str) -> list[str]:
    """A CSV whose cohort column names some rows' cohort and leaves others blank: those take the default name,
    which the user should know before a cohort split reads it."""
    named = sum(c.cohort is not None for c in candidates)
    if cfg.cohort or named in (0, len(candidates)):
        return []
    return [f"{len(candidates) - named:,} rows have no cohort in the CSV's cohort column; they take cohort "
            f"{default!r} (the CSV's folder), beside the named ones"]


def build_manifest(source: Path, cfg: IndexConfig, progress: Callable[[int], None] | None = None,
                   on_total: Callable[[int], None] | None = None) -> IndexResult:
    """Scan a folder or CSV, inspect every candidate, and return the manifest and what was left out."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        scan: ScanResult = scan_csv(source, cfg.label_column, cfg.patient_column)
        default_cohort = source.parent.name
    else:
        scan = scan_folder(source, cfg.extensions, cfg.follow_symlinks)
        default_cohort = source.resolve().name
    problems = list(scan.problems)
    if on_total:
        on_total(len(scan.candidates))
    rows = []
    for cand, info in zip(scan.candidates, _inspect_all(scan.candidates, cfg, progress)):
        if isinstance(info, str):
            problems.append(Problem(str(cand.path), info))
            continue
        cohort = cfg.cohort or cand.cohort or default_cohort
        rows.append({
            "cell_id": cell_id(cohort, cand.rel), "path": cand.rel, "label": cand.label,
            "patient": cand.patient, "cohort": cohort, "bytes": info.bytes, "sha256": info.sha256,
            "pixels_sha256": info.pixels_sha256,
            "mtime_ns": info.mtime_ns, "width": info.width, "height": info.height, "mode": info.mode,
            "format": info.format, **cand.extra,
        })
    extra_columns = list(scan.candidates[0].extra) if scan.candidates else []
    table = pd.DataFrame(rows, columns=CORE_COLUMNS + extra_columns)
    table, conflicts = _reject_label_conflicts(table, scan.root)
    problems += conflicts
    for name, folder in scan.class_dirs.items():
        if name not in set(table["label"]):
            problems.append(Problem(str(folder), "class folder has no usable images"))
    if table.empty:
        raise NoUsableImages(f"{source}: no usable images ({len(problems)} problems)", problems)
    dupes = int(table.duplicated("sha256").sum())
    warnings = _patients_in_several_classes(table) + _cohorts_left_blank(scan.candidates, cfg, default_cohort)
    table = table.sort_values(["label", "patient", "path"], na_position="first", kind="stable").reset_index(drop=True)
    meta = {"source": str(source.resolve()), "layout": scan.layout}
    return IndexResult(Manifest(table, scan.root.resolve(), meta), problems, scan.layout, len(scan.candidates), dupes,
                       scan.outside_root, warnings)


def write_manifest(manifest: Manifest, path: Path) -> None:
    """Write the manifest as Parquet, atomically, with root and history in the schema metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**manifest.meta, "root": str(manifest.root), "digest": manifest.digest()}
    table = pa.Table.from_pandas(manifest.table, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_manifest(path: Path) -> Manifest:
    """Read a manifest written by ``write_manifest``; errors say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist (make one with `aml-rapids index`)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"manifest {path} is not a readable Parquet file: {exc}") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise DataError(f"{path} is a Parquet file but not an aml-rapids manifest (no {META_KEY.decode()} metadata)")
    try:
        meta = json.loads(raw)
        root = Path(meta.pop("root"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"manifest {path} has damaged aml-rapids metadata ({type(exc).__name__}: {exc}); "
                        "re-run `aml-rapids index`") from None
    frame = table.to_pandas()
    missing = [c for c in CORE_COLUMNS if c not in frame.columns and c not in OPTIONAL_COLUMNS]
    if missing:
        raise DataError(f"manifest {path} lacks columns {', '.join(missing)}")
    if frame.empty:
        raise DataError(f"manifest {path} lists no cells")
    odd = [c for c in INTEGER_COLUMNS if c in frame and not pd.api.types.is_integer_dtype(frame[c])]
    odd += [c for c in ("cell_id", "path", "label", "sha256") if frame[c].isna().any()]
    if odd:
        raise DataError(f"manifest {path}: column(s) {', '.join(odd)} hold missing or non-integer values (edited, or "
                        "not written by `aml-rapids index`); re-run `aml-rapids index`")
    return Manifest(frame, root, {k: v for k, v in meta.items() if k != "digest"})


def write_rejects(problems: list[Problem], path: Path) -> None:
    """Every file or folder left out, with the reason, as CSV (written even when empty, so absence is news)."""
    rows = [(printable(p.path), "skipped" if p.skipped else "rejected", p.reason) for p in problems]
    pd.DataFrame(rows, columns=["path", "action", "reason"]).to_csv(path, index=False)


def summarize(manifest: Manifest) -> dict:
    """Counts a person checks first: cells, classes, patients, cells per class."""
    t = manifest.table
    return {
        "cells": len(t),
        "classes": int(t["label"].nunique()),
        "patients": int(len(t.dropna(subset=["patient"]).drop_duplicates(["cohort", "patient"]))),
        "per_class": {str(k): int(v) for k, v in t["label"].value_counts().sort_index().items()},
    }


def read_source(source: Path, index: IndexConfig) -> Manifest:
    """A manifest (``.parquet``), or a folder or CSV of images indexed in memory."""
    source = Path(source)
    if source.suffix == ".parquet":
        return read_manifest(source)
    try:
        return build_manifest(source, index).manifest
    except NoUsableImages as exc:
        reasons = "; ".join(f"{printable(p.path)}: {p.reason}" for p in exc.problems[:3])
        raise DataError(f"{exc}" + (f", e.g. {reasons}" if reasons else "") + "; `aml-rapids index` lists them all "
                        "in rejects.csv") from None
