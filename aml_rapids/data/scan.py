"""Find candidate images and their labels: a ``<class>/<patient>/<image>`` or ``<class>/<image>`` tree, or a CSV.

Nothing here opens an image; the result is a list of candidates plus the problems met on the way.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import DataError

LABEL_COLUMNS = ("label", "class", "diagnosis")
PATIENT_COLUMNS = ("patient", "patient_id")


@dataclass
class Candidate:
    """One file that should be an image of one cell, with what its location or CSV row says about it."""

    path: Path
    rel: str
    label: str
    patient: str | None = None
    cohort: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Problem:
    """A file or folder left out, and why; ``skipped`` marks files that never claimed to be images."""

    path: str
    reason: str
    skipped: bool = False


@dataclass
class ScanResult:
    root: Path
    layout: str
    candidates: list[Candidate]
    problems: list[Problem]
    class_dirs: dict[str, Path] = field(default_factory=dict)
    outside_root: list[str] = field(default_factory=list)  # CSV paths that leave the CSV's folder


class NoUsableImages(DataError):
    """Nothing usable was found; ``problems`` says what was left out and why (the rejects file still lists it)."""

    def __init__(self, message: str, problems: list[Problem]):
        super().__init__(message)
        self.problems = problems


def printable(path: Path | str) -> str:
    """A path as text that can be printed and written to CSV or Parquet: bytes that are not UTF-8 shown as
    ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _walk_files(root: Path, follow_symlinks: bool, problems: list[Problem]):
    """Yield files under root; symlinked folders that lead back into the walk are reported, not followed."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks, onerror=lambda e: problems.append(
            Problem(str(e.filename), f"cannot list folder: {e.strerror}"))):
        st = os.stat(dirpath)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            problems.append(Problem(dirpath, f"symlink loop: leads back to {os.path.realpath(dirpath)}, not followed"))
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _not_regular(path: Path) -> str | None:
    """Why ``path`` is not a regular file (reading a FIFO would block forever), or None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        dangling = exc.errno == errno.ENOENT and path.is_symlink()
        return f"cannot be read: {exc.strerror}" + (" (a dangling link)" if dangling else "")
    if stat.S_ISREG(mode):
        return None
    return "not a regular file (" + ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                                     else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder") + ")"


def scan_folder(root: Path, extensions: tuple[str, ...], follow_symlinks: bool = True) -> ScanResult:
    """Collect images laid out as ``<class>/<patient>/<image>`` (depth 3) or ``<class>/<image>`` (depth 2)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a folder (give a folder or a .csv manifest)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"dataset root {root} is not readable")
    exts = {e.lower() for e in extensions}
    problems: list[Problem] = []
    by_depth: dict[int, list[tuple[Path, tuple[str, ...]]]] = {}
    for path in _walk_files(root, follow_symlinks, problems):
        parts = path.relative_to(root).parts
        if printable(path) != str(path):
            problems.append(Problem(printable(path), "file or folder name is not valid UTF-8; rename it"))
        elif (kind := _not_regular(path)) is not None:
            problems.append(Problem(str(path), kind, path.suffix.lower() not in exts))
        elif path.suffix.lower() not in exts:
            problems.append(Problem(str(path), f"unsupported file type {path.suffix or '(no extension)'!r}", True))
        elif len(parts) == 1:
            problems.append(Problem(str(path), "image directly under the root, not inside a class folder"))
        else:
            by_depth.setdefault(len(parts), []).append((path, parts))
    class_dirs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir()}
    if not by_depth:
        raise NoUsableImages(f"no images with extensions {', '.join(sorted(exts))} found under {root}", problems)
    depth = max((d for d in by_depth if d in (2, 3)), key=lambda d: len(by_depth[d]), default=None)
    if depth is None:
        raise NoUsableImages(f"{root}: images must sit at <class>/<image> or <class>/<patient>/<image>", problems)
    layout = "class/patient/image" if depth == 3 else "class/image"
    candidates = []
    for d, files in sorted(by_depth.items()):
        for path, parts in files:
            if d != depth:
                problems.append(Problem(str(path), f"at depth {d}, but this dataset uses the {layout} layout"))
                continue
            patient = parts[1] if depth == 3 else None
            candidates.append(Candidate(path, "/".join(parts), parts[0], patient))
    return ScanResult(root, layout, candidates, problems, class_dirs)


def _pick_column(columns, wanted: str | None, aliases: tuple[str, ...], csv: Path, what: str, required: bool):
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{csv}: no column {wanted!r} for the {what}; columns are {', '.join(columns)}")
        return wanted
    for alias in aliases:
        if alias in columns:
            return alias
    if required:
        raise DataError(f"{csv}: missing the {what} column (one of {', '.join(aliases)}); "
                        f"columns are {', '.join(columns)}")
    return None


def scan_csv(csv: Path, label_column: str | None = None, patient_column: str | None = None) -> ScanResult:
    """Collect images listed in a CSV: ``path`` (relative to the CSV's folder or absolute), a label column,
    and optional patient and cohort columns; other columns are carried into the manifest."""
    csv = Path(csv)
    if not csv.is_file():
        raise DataError(f"CSV manifest {csv} does not exist")
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv} is not a readable CSV: {exc}") from None
    columns = list(table.columns)
    if "path" not in columns:
        raise DataError(f"{csv}: missing the 'path' column; columns are {', '.join(columns) or '(none)'}")
    label_col = _pick_column(columns, label_column, LABEL_COLUMNS, csv, "label", required=True)
    patient_col = _pick_column(columns, patient_column, PATIENT_COLUMNS, csv, "patient", required=False)
    extra_cols = [c for c in columns if c not in {"path", label_col, patient_col, "cohort"}]
    root = csv.parent
    candidates, problems, outside, first_line = [], [], [], {}
    for line, row in enumerate(table.to_dict("records"), start=2):
        rel = row["path"]
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        if not rel:
            problems.append(Problem(f"{csv}:{line}", "empty path"))
        elif "\0" in rel:
            problems.append(Problem(f"{csv}:{line}", "path holds a NUL character"))
        elif not row[label_col]:
            problems.append(Problem(str(path), f"no label in {csv} line {line}"))
        elif not path.exists():
            problems.append(Problem(str(path), f"listed in {csv} line {line} but does not exist"))
        elif (kind := _not_regular(path)) is not None:
            problems.append(Problem(str(path), f"listed in {csv} line {line}, but {kind}"))
        elif rel in first_line:
            problems.append(Problem(str(path), f"listed twice in {csv} (lines {first_line[rel]} and {line}); "
                                               "the second is left out"))
        else:
            first_line[rel] = line
            if not path.resolve().is_relative_to(root.resolve()):
                outside.append(str(path))
            candidates.append(Candidate(
                path, rel, row[label_col], (row[patient_col] or None) if patient_col else None,
                row.get("cohort") or None, {c: row[c] for c in extra_cols}))
    if not candidates and not problems:
        raise DataError(f"{csv} lists no images")
    return ScanResult(root, "csv", candidates, problems, outside_root=outside)
