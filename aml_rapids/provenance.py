"""What a run was made with: software versions, machine, git commit; written into every output folder."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import secrets
import subprocess
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import metadata
from pathlib import Path

from . import __version__
from .config import RunConfig, dump_config
from .logs import keep_in, warn
from .outputs import atomic_write_text

TRACKED_PACKAGES = (
    "numpy", "pandas", "pyarrow", "pillow", "torch", "torchvision", "nvidia-dali-cuda130",
    "nvidia-dali-cuda120", "zarr", "scikit-learn", "cuml-cu13", "cuml-cu12", "cupy-cuda13x",
    "cupy-cuda12x", "dask", "distributed", "dask-cuda", "dask-jobqueue", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf",
    "torch-tensorrt",
)


def software_versions() -> dict[str, str]:
    """Installed versions of the packages that change results or speed (absent ones are left out)."""
    return dict(_versions())


@functools.lru_cache(maxsize=None)
def _versions() -> dict[str, str]:
    """Read once a process: every record (a fine-tuning writes one at each checkpoint) asks again."""
    versions = {"python": platform.python_version(), "aml-rapids": __version__}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _gpus() -> tuple[dict[str, str], ...]:
    """Asked of nvidia-smi once a process (a subprocess each time, otherwise, for every record written)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in out.strip().splitlines():
        name, driver, memory = (part.strip() for part in line.split(","))
        gpus.append({"name": name, "driver": driver, "memory": memory})
    return tuple(gpus)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which a batch scheduler may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_info() -> dict:
    """CPU model, usable cores, memory and GPUs of this machine."""
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu": _cpu_model(),
        "cores": usable_cores(),
        "memory_gib": mem_gib,
        "gpus": [dict(gpu) for gpu in _gpus()],
    }


@functools.lru_cache(maxsize=None)
def git_commit(path: Path | None = None) -> str | None:
    """``AML_RAPIDS_COMMIT`` when set (a copy of the tree whose .git is missing or stale, as on a borrowed GPU
    machine), else the commit of the aml-rapids checkout it runs from. Read once a process: the code a process
    runs is the code it started with, whatever is committed while it runs."""
    if os.environ.get("AML_RAPIDS_COMMIT"):
        return os.environ["AML_RAPIDS_COMMIT"]
    here = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def new_run_id() -> str:
    """A run's id: its UTC start time (sorts in time order) and a random tail (two runs in one second differ)."""
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


_run_id: ContextVar[str | None] = ContextVar("aml_rapids_run_id", default=None)


@contextmanager
def run_scope(run_id: str | None = None):
    """Every record written inside carries one run id (a command's stages, e.g. all of ``run``'s): ``run_id``,
    or the enclosing scope's, or a new one."""
    token = _run_id.set(run_id or _run_id.get() or new_run_id())
    try:
        yield _run_id.get()
    finally:
        _run_id.reset(token)


def current_run_id() -> str:
    """The id of the run in progress (a new one outside ``run_scope``)."""
    return _run_id.get() or new_run_id()


def run_record(stage: str, config: RunConfig, run_id: str, **details) -> dict:
    """The provenance of one stage's run: command line, resolved config, versions, machine and details."""
    return {
        "stage": stage,
        "run_id": run_id,
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
        "argv": sys.argv,
        "git_commit": git_commit(),
        "versions": software_versions(),
        "machine": machine_info(),
        "config": config.model_dump(mode="json"),
        "details": details,
    }


def write_run_record(out_dir: Path, stage: str, config: RunConfig, **details) -> Path:
    """Write ``<out_dir>/runs/<run id>-<stage>.json`` (a folder keeps every run's record) and the latest resolved
    ``config.yaml`` beside the outputs; the command's log is kept from here on in ``runs/<run id>.log``."""
    run_id = current_run_id()
    runs = Path(out_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    keep_in(out_dir)
    atomic_write_text(Path(out_dir) / "config.yaml", dump_config(config))
    path, k = runs / f"{run_id}-{stage}.json", 1
    while path.exists():  # the same stage twice in one run (a study's extractions)
        k += 1
        path = runs / f"{run_id}-{stage}.{k}.json"
    atomic_write_text(path, json.dumps(run_record(stage, config, run_id, **details), indent=2, default=str))
    return path


def run_records(out_dir: Path, stage: str | None = None) -> list[dict]:
    """The run records in ``out_dir/runs`` (of one stage, if given), oldest first."""
    records = []
    for path in sorted((Path(out_dir) / "runs").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            warn(f"run record {path} cannot be read ({exc}); left out")
            continue
        if not isinstance(record, dict) or "time_utc" not in record or "stage" not in record:
            warn(f"{path} is not an aml-rapids run record; left out")
            continue
        if stage in (None, record["stage"]):
            records.append(record)
    return sorted(records, key=lambda r: r["time_utc"])
