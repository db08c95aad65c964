"""Writing results so that nothing is half-written: output folders checked before long work starts, and files
replaced atomically (written beside their place, then renamed over it), so a kill or a full disk leaves the
previous version or the new one, never a torn file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from .errors import DataError, OutputError
from .logs import warn


def prepare_output_dir(path: Path, what: str = "output folder") -> Path:
    """Create ``path`` (and its parents) and check that files can be made in it; a clear error otherwise."""
    path = Path(path)
    blocking = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise OutputError(f"{what} {path}: {blocking} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OutputError(f"{what} {path} cannot be written: {exc.strerror or exc}") from None
    return path


RECORDS = ("runs", "config.yaml")  # every command's run records: a folder's history, kept


def prepare_fresh_dir(path: Path, what: str, outputs: Iterable[str], overwrite: bool, delete: bool = True) -> Path:
    """A folder for one command's results: new or empty; or, with ``overwrite``, one holding this command's
    earlier results (names matching the glob patterns ``outputs``, and run records), which are deleted (not yet
    with ``delete`` false: a command that builds its results aside checks first, and replaces them once they
    are good). Anything else in it is refused either way, so nothing of the user's is deleted and two runs never
    share a folder."""
    prepare_output_dir(path, what)
    patterns = (*outputs, ".*.tmp")  # .tmp: what a killed atomic_write left
    names = sorted(p.name for p in path.iterdir())
    ours = [n for n in names if any(fnmatch(n, pattern) for pattern in patterns)]
    foreign = [n for n in names if n not in ours and (n not in RECORDS or not ours)]
    if foreign:
        raise OutputError(f"{what} {path} holds files this command did not write ({', '.join(foreign[:5])}); "
                          "use a new or empty folder")
    if ours and not overwrite:
        raise OutputError(f"{what} {path} already holds an earlier run's results ({', '.join(ours[:5])}); use a "
                          "new folder, or pass --overwrite to replace them")
    real = [n for n in ours if not fnmatch(n, ".*.tmp")]
    if not delete:
        return path
    if real:
        warn(f"--overwrite: replacing the earlier results in {path}: {', '.join(real)}")
    for name in ours:
        shutil.rmtree(path / name) if (path / name).is_dir() else (path / name).unlink()
    return path


@contextmanager
def removed_if_left_empty(folder: Path, fresh: bool):
    """A folder this command made (``fresh``) is removed again if it fails before writing anything into it: a
    refused run leaves nothing behind."""
    try:
        yield
    except BaseException:
        if fresh and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def read_json(path: Path):
    """A JSON file this package wrote (a report, a record); one that is gone or torn is a DataError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc}); write it again with the "
                        "command that made it") from None


def slug(name: str) -> str:
    """A backbone's name as one file or array name: a name with other characters than A-Z a-z 0-9 . _ - (a
    timm name holds ':', a hub name '/') has each run of them as '-' and its own hash appended, so two names never
    share a folder or an array; plain names are unchanged."""
    plain = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    return plain if plain == name else f"{plain}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def cache_home() -> Path:
    """aml-rapids' own cache folder: ``$AML_RAPIDS_CACHE``, by default ``~/.cache/aml-rapids`` (converted engines,
    registered weights)."""
    return Path(os.environ.get("AML_RAPIDS_CACHE") or Path.home() / ".cache" / "aml-rapids")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save_array(path: Path, values) -> Path:
    """``values`` as a .npy file (``np.load`` reads it), written atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save given a name would append .npy to the temporary one
            np.save(fh, values)
    return atomic_write(path, write)
