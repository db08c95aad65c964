"""One writer per feature store: an exclusive lock on ``<store>.lock`` beside it, held while a process creates,
appends to or fills the store.

The lock is the kernel's (``flock``; NFS clients map it to a byte-range lock), so it goes with its holder: a
writer killed by SIGKILL or a crashed node leaves no lock behind, only the holder's record in the file (host,
pid, start time, command), which the next writer reports as an interrupted run it takes over. A second writer
is refused at once with the holder named. The lock file itself stays: deleting it would let two processes lock
two different files of one name.

A Dask extraction (``scale/``) holds the lock in its coordinating process for the whole job and names the job in
the record; its workers, on any node, write only while the lock is held and names their job (``check_lease``), so a
worker left over from a stopped job never writes into a store that another job has taken.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path

from ..errors import BusyError, OutputError
from ..outputs import prepare_output_dir


def lock_path(store: Path) -> Path:
    return Path(store).with_name(Path(store).name + ".lock")


def _holder_text(raw: str) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on host {h['host']}, since {h['since']}: {' '.join(h['argv'])}"
    except (ValueError, KeyError, TypeError):
        return "a process whose record is unreadable"


def _read_holder(fd: int, wait_s: float = 1.0) -> str:
    """The holder's record; a holder that has just taken the lock writes it a moment later, so wait a little."""
    deadline = time.monotonic() + wait_s
    while True:
        raw = os.pread(fd, 1 << 16, 0).decode(errors="replace")
        text = _holder_text(raw)
        if not text.startswith("a process") or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


class StoreLock:
    """``with StoreLock(store):`` holds the store's write lock or raises BusyError naming the holder.
    ``interrupted`` is the record of an earlier writer that ended without releasing it (None if none);
    ``job``: a Dask job's id, written into the record for its workers' ``check_lease``."""

    def __init__(self, store: Path, job: str | None = None):
        self.store, self.path, self.job = Path(store), lock_path(store), job
        self.fd: int | None = None
        self.interrupted: str | None = None

    def __enter__(self) -> "StoreLock":
        prepare_output_dir(self.path.parent, "store folder")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
            os.close(fd)
            if holder is not None:
                raise BusyError(f"feature store {self.store} is being written by another process ({holder}); "
                                "wait for it to finish or write another store") from None
            raise OutputError(f"cannot lock {self.path} ({exc.strerror}); this file system does not support "
                              "file locks: put the store on one that does") from None
        previous = os.pread(fd, 1 << 16, 0).decode(errors="replace").strip()
        self.interrupted = _holder_text(previous) if previous else None
        record = {"host": platform.node(), "pid": os.getpid(), "argv": sys.argv,
                  "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if self.job is not None:
            record["job"] = self.job
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError as exc:
            os.close(fd)  # releases the lock
            raise OutputError(f"cannot write the lock file {self.path}: {exc.strerror or exc}") from None
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty record: released cleanly
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def check_lease(store: Path, job: str) -> None:
    """Raise BusyError unless the lock of ``store`` is held, and held for Dask job ``job``: a worker's check
    before it writes, since the job that started it may have ended (its lock then free, though its record stays
    after a kill) and another may have taken the store."""
    path = lock_path(store)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise BusyError(f"cannot open the lock {path} of feature store {store} ({exc.strerror or exc}); this worker "
                        "writes only for the job that holds it") from None
    try:
        try:  # shared: lease checks never block each other, only the job's exclusive lock blocks them
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BusyError(f"cannot check the lock {path} of feature store {store} ({exc.strerror or exc}); "
                                "this file system does not support file locks: put the store on one that does") from None
            held = True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            held = False
        raw = os.pread(fd, 1 << 16, 0).decode(errors="replace")
    finally:
        os.close(fd)
    if not held:
        raise BusyError(f"feature store {store} is no longer held by any job (Dask job {job} has ended); this "
                        "worker's unit is dropped, and a rerun computes it")
    try:
        holder = json.loads(raw).get("job") if raw.strip() else None
    except (ValueError, AttributeError):
        holder = None
    if holder != job:
        now = f"now held by {_holder_text(raw)}" if raw.strip() else "its record is gone"
        raise BusyError(f"feature store {store} is no longer held for Dask job {job} ({now}); this worker's unit "
                        "is dropped, and the job holding the store computes it")
