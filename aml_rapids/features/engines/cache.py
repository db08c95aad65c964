"""Converted models on disk, so that only a machine's first run pays for conversion (and int8 calibration).

An artefact lives in a folder named by the hash of everything that makes it (backbone, weights sha256, engine,
precision, image size, device, the converting packages' versions, and for int8 the calibration cells), with a
``artefact.json`` listing its files' sha256. A folder whose files do not match it (a partial copy, a disk
error) is rebuilt, not trusted. The folder is ``$AML_RAPIDS_CACHE/engines`` (default ``~/.cache/aml-rapids``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ...errors import OutputError
from ...logs import warn
from ...outputs import atomic_write_text, cache_home, file_sha256


def cache_root() -> Path:
    return cache_home() / "engines"


def key_of(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _intact(folder: Path) -> bool:
    try:
        record = json.loads((folder / "artefact.json").read_text())
        return all(file_sha256(folder / name) == sha for name, sha in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"engine cache {folder} cannot be written ({exc.strerror or exc}); set AML_RAPIDS_CACHE "
                          "to a writable folder") from None


def artefact(fields: dict, build: Callable[[Path], None]) -> Path:
    """The cached folder for ``fields``, built by ``build(folder)`` (which writes the model files into it)
    when absent or damaged. Built beside its place and renamed in, so a crash leaves no half folder."""
    folder = cache_root() / key_of(fields)
    _writable(folder.parent)
    if folder.exists():
        if _intact(folder):
            return folder
        warn(f"engine cache {folder} is incomplete or damaged (its files do not match artefact.json); rebuilding it")
        shutil.rmtree(folder, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build(work)
        files = {p.name: file_sha256(p) for p in sorted(work.iterdir())}
        (work / "artefact.json").write_text(json.dumps({"made_of": fields, "files": files}, indent=1, default=str))
        try:
            work.rename(folder)
        except OSError:  # another process put it there first: theirs is as good
            if not _intact(folder):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def remembered(fields: dict) -> dict | None:
    """A choice ``auto`` made earlier on this machine for the same question, if any."""
    try:
        return json.loads((cache_root() / "choices" / f"{key_of(fields)}.json").read_text())["choice"]
    except (OSError, ValueError, KeyError):
        return None


def remember(fields: dict, choice: dict) -> None:
    path = cache_root() / "choices" / f"{key_of(fields)}.json"
    _writable(path.parent)
    atomic_write_text(path, json.dumps({"question": fields, "choice": choice}, indent=1, default=str))
