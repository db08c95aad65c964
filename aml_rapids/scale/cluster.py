"""The Dask cluster a run's ``scale`` section asks for, as a connected ``distributed.Client``.

``local`` starts CPU worker processes on this machine (what tests and CPU machines use); ``local-cuda`` starts
dask-cuda's LocalCUDACluster, one worker per GPU, each pinned to its device by CUDA_VISIBLE_DEVICES;
``scheduler-file`` joins a cluster that a job script started (``dask scheduler --scheduler-file F`` and ``dask
worker`` / ``dask cuda worker`` on the nodes); ``slurm`` submits worker jobs with dask-jobqueue. Whatever cannot be
started or reached is a ClusterError naming the problem, raised before any work. Stages that run inside an open
``dask_client`` of the same settings (``aml-rapids run``: extract, then train) share its cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path

from distributed import WorkerPlugin

from ..config import ScaleConfig
from ..errors import ClusterError
from ..logs import log, say
from ..provenance import usable_cores


DASHBOARD = ":0"  # a free port: the dashboard's link is logged, and a second cluster on the machine never clashes
_OPEN: ContextVar[tuple[ScaleConfig, object] | None] = ContextVar("aml_rapids_dask_client", default=None)


class IgnoreInterrupts(WorkerPlugin):
    """Ctrl-C reaches every process of the terminal's process group, the workers this process started too; they
    leave the stop to this process, which closes them cleanly (their own KeyboardInterrupts only print
    tracebacks)."""

    name = "aml-rapids-ignore-interrupts"

    def setup(self, worker) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def visible_gpus() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES respected)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local(scale: ScaleConfig):
    from distributed import LocalCluster

    return LocalCluster(n_workers=scale.workers or usable_cores(), threads_per_worker=scale.threads_per_worker,
                        processes=True, memory_limit=scale.memory_per_worker, dashboard_address=DASHBOARD,
                        silence_logs=logging.ERROR)


def _local_cuda(scale: ScaleConfig):
    gpus = visible_gpus()
    if gpus == 0:
        raise ClusterError("scale.cluster=local-cuda, but no CUDA GPU is visible here; use scale.cluster=local on a "
                           "CPU machine")
    if scale.workers and scale.workers > gpus:
        raise ClusterError(f"scale.workers={scale.workers}, but {gpus} GPU(s) are visible (CUDA_VISIBLE_DEVICES): "
                           "local-cuda runs one worker per GPU; ask for at most that many")
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise ClusterError("scale.cluster=local-cuda needs dask-cuda: pip install 'aml-rapids[cu13]' (or [cu12])") from None
    return LocalCUDACluster(n_workers=scale.workers or gpus, threads_per_worker=scale.threads_per_worker,
                            memory_limit=scale.memory_per_worker, dashboard_address=DASHBOARD,
                            silence_logs=logging.ERROR)


def _slurm_class():
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ClusterError("scale.cluster=slurm needs dask-jobqueue: pip install 'aml-rapids[slurm]'") from None
    return SLURMCluster


def slurm_cluster(scale: ScaleConfig):
    """dask-jobqueue's SLURMCluster for ``scale.slurm``, no job submitted yet (``cluster.job_script()`` shows what
    each job runs)."""
    SLURMCluster = _slurm_class()
    job = scale.slurm
    directives = list(job.job_extra_directives) + ([f"--gres=gpu:{job.gpus}"] if job.gpus else [])
    # A GPU job runs dask-cuda's worker (``python -m dask_cuda.cli``), which starts one worker per GPU of the job,
    # each pinned to its device; dask-jobqueue gives each its share of the job's threads and memory.
    gpu_worker = {"worker_command": "dask_cuda.cli"} if job.gpus else {}
    return SLURMCluster(queue=job.queue, account=job.account, walltime=job.walltime, cores=job.cores,
                        memory=job.memory, processes=max(job.gpus, 1), job_extra_directives=directives,
                        interface=job.interface, scheduler_options={"dashboard_address": DASHBOARD}, **gpu_worker)


def _slurm(scale: ScaleConfig):
    _slurm_class()
    if shutil.which("sbatch") is None:
        raise ClusterError("scale.cluster=slurm submits its workers with sbatch, which is not on PATH here: run "
                           "aml-rapids where SLURM's commands work (a login node), or start the cluster in a job "
                           "script and join it with scale.cluster=scheduler-file (docs/hpc.md)")
    cluster = slurm_cluster(scale)
    cluster.scale(jobs=scale.workers or 1)
    return cluster


def _scheduler_address(path: Path) -> str:
    """The address in a scheduler file, checked before connecting (distributed would wait for it forever)."""
    if path.is_dir():
        raise ClusterError(f"scheduler file {path} is a folder: give the file `dask scheduler --scheduler-file` "
                           "wrote")
    if not path.is_file():
        raise ClusterError(f"scheduler file {path} does not exist: start the scheduler with `dask scheduler "
                           f"--scheduler-file {path}` (on storage every node sees) and wait until it is written")
    try:
        address = json.loads(path.read_text())["address"]
        if not isinstance(address, str):
            raise TypeError(f"the address is a {type(address).__name__}, not text")
        from distributed.comm import get_address_host_port, parse_address

        if parse_address(address)[0] != "inproc":  # a network address names its port (inproc: this process)
            get_address_host_port(address)
        return address
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"scheduler file {path} names no scheduler address ({type(exc).__name__}: {exc}); it "
                           "is the JSON file `dask scheduler --scheduler-file` writes") from None


def _connect(address: str, path: Path, timeout: float):
    """A Client of the scheduler at ``address``, or a ClusterError within the timeout. The connection is made on
    a thread with a deadline: a port held by something that is not a Dask scheduler (a scheduler file left by an
    earlier job, its port since reused) accepts the connection and never answers the handshake."""
    from distributed import Client

    made: dict = {}

    def connect() -> None:
        try:
            made["client"] = Client(address, timeout=timeout)
        except BaseException as exc:  # reported on the calling thread
            made["error"] = exc

    thread = threading.Thread(target=connect, name="aml-rapids-dask-connect", daemon=True)
    thread.start()
    thread.join(timeout + 1)  # Client's own timeout first, where it has one
    stale = "is the scheduler job still running? A scheduler file from an earlier job is stale: delete it"
    if thread.is_alive():
        raise ClusterError(f"nothing answered as a Dask scheduler at {address} (from {path}) within {timeout:g} s; "
                           f"{stale}")
    if "error" in made:
        exc = made["error"]
        raise ClusterError(f"no Dask scheduler answered at {address} (from {path}) within {timeout:g} s "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); {stale}") from None
    return made["client"]


def _close(cluster) -> None:
    """Shut a cluster down; one that never finished starting (a SLURM job still queued) may refuse, and that must
    not hide why the run stopped."""
    try:
        cluster.close()
    except Exception as exc:
        log.debug(f"closing the Dask cluster: {type(exc).__name__}: {exc}")


NO_WORKER = {
    "scheduler-file": "start workers against its scheduler (`dask worker --scheduler-file ...`)",
    "slurm": "its SLURM jobs may still wait in the queue (squeue); raise scale.connect_timeout_s",
}


@contextmanager
def dask_client(scale: ScaleConfig) -> Iterator:
    """A Client connected to the configured cluster with at least one worker, closed (and a cluster it started
    shut down) on exit; the client already open in this context when its settings are the same. ``scale.cluster``
    must not be ``none``."""
    from distributed import Client

    already = _OPEN.get()
    if already is not None and already[0] == scale:
        yield already[1]
        return
    with ExitStack() as stack:
        timeout = scale.connect_timeout_s
        if scale.cluster == "scheduler-file":
            path = Path(scale.scheduler_file)
            client = _connect(_scheduler_address(path), path, timeout)
        else:
            start = {"local": _local, "local-cuda": _local_cuda, "slurm": _slurm}[scale.cluster]
            try:
                cluster = start(scale)
            except ClusterError:
                raise
            except (OSError, TimeoutError, ValueError) as exc:
                raise ClusterError(f"could not start the {scale.cluster} Dask cluster: {type(exc).__name__}: {exc}") from None
            stack.callback(_close, cluster)
            client = Client(cluster, timeout=timeout)
        stack.callback(client.close)
        if scale.cluster in ("local", "local-cuda"):
            client.register_plugin(IgnoreInterrupts())
        try:
            client.wait_for_workers(1, timeout=timeout)
        except (TimeoutError, asyncio.TimeoutError):  # two classes before Python 3.11
            raise ClusterError(f"the Dask cluster at {client.scheduler.address} has no worker after {timeout:g} s "
                               f"(scale.connect_timeout_s): {NO_WORKER.get(scale.cluster, 'see its log')}") from None
        workers = client.scheduler_info(n_workers=-1)["workers"]
        say(f"Dask cluster ({scale.cluster}): {len(workers)} worker(s), "
            f"{sum(w['nthreads'] for w in workers.values())} thread(s), scheduler {client.scheduler.address}, "
            f"dashboard {client.dashboard_link}")
        log.debug("workers: " + ", ".join(workers))
        token = _OPEN.set((scale, client))
        try:
            yield client
        finally:
            _OPEN.reset(token)
