"""The Dask cluster a run's ``scale`` section asks for, as a connected ``distributed.Client``.

``local`` starts CPU worker processes on this machine (what tests and CPU machines use); ``local-cuda`` starts
dask-cuda's LocalCUDACluster, one worker per GPU, each pinned to its device by CUDA_VISIBLE_DEVICES;
``scheduler-file`` joins a cluster that a job script started (``dask scheduler --scheduler-file F`` and ``dask
worker`` / ``dask cuda worker`` on the nodes); ``slurm`` submits worker jobs with dask-jobqueue. Whatever cannot be
started or reached is a ClusterError naming the problem, raised before any work. Stages that run inside an open
``dask_client`` of the same settings (``aml-rapids run``: extract, then train) share its cluster.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path

from ..config import ScaleConfig
from ..errors import ClusterError
from ..logs import log, say
from ..provenance import usable_cores


DASHBOARD = ":0"  # a free port: the dashboard's link is logged, and a second cluster on the machine never clashes
_OPEN: ContextVar[tuple[ScaleConfig, object] | None] = ContextVar("aml_rapids_dask_client", default=None)


def visible_gpus() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES respected)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local(scale: ScaleConfig):
    from distributed import LocalCluster

    return LocalCluster(n_workers=scale.workers or usable_cores(), threads_per_worker=scale.threads_per_worker,
                        processes=True, memory_limit=scale.memory_per_worker, dashboard_address=DASHBOARD)


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
                            memory_limit=scale.memory_per_worker, dashboard_address=DASHBOARD)


def slurm_cluster(scale: ScaleConfig):
    """dask-jobqueue's SLURMCluster for ``scale.slurm``, no job submitted yet (``cluster.job_script()`` shows what
    each job runs)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ClusterError("scale.cluster=slurm needs dask-jobqueue: pip install 'aml-rapids[slurm]'") from None
    job = scale.slurm
    directives = list(job.job_extra_directives) + ([f"--gres=gpu:{job.gpus}"] if job.gpus else [])
    # A GPU job runs dask-cuda's worker (``python -m dask_cuda.cli``), which starts one worker per GPU of the job,
    # each pinned to its device; dask-jobqueue gives each its share of the job's threads and memory.
    gpu_worker = {"worker_command": "dask_cuda.cli"} if job.gpus else {}
    return SLURMCluster(queue=job.queue, account=job.account, walltime=job.walltime, cores=job.cores,
                        memory=job.memory, processes=max(job.gpus, 1), job_extra_directives=directives,
                        interface=job.interface, scheduler_options={"dashboard_address": DASHBOARD}, **gpu_worker)


def _slurm(scale: ScaleConfig):
    cluster = slurm_cluster(scale)
    cluster.scale(jobs=scale.workers or 1)
    return cluster


def _scheduler_address(path: Path) -> str:
    """The address in a scheduler file, checked before connecting (distributed would wait for it forever)."""
    if not path.is_file():
        raise ClusterError(f"scheduler file {path} does not exist: start the scheduler with `dask scheduler "
                           f"--scheduler-file {path}` (on storage every node sees) and wait until it is written")
    try:
        return json.loads(path.read_text())["address"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"scheduler file {path} names no scheduler address ({type(exc).__name__}: {exc}); it "
                           "is the JSON file `dask scheduler --scheduler-file` writes") from None


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
            address = _scheduler_address(path)
            try:
                client = stack.enter_context(Client(address, timeout=timeout))
            except (OSError, TimeoutError) as exc:
                raise ClusterError(f"no Dask scheduler answered at {address} (from {path}) within {timeout:g} s "
                                   f"({type(exc).__name__}); is the scheduler job still running? A scheduler file "
                                   "from an earlier job is stale: delete it") from None
        else:
            start = {"local": _local, "local-cuda": _local_cuda, "slurm": _slurm}[scale.cluster]
            try:
                cluster = stack.enter_context(start(scale))
            except ClusterError:
                raise
            except (OSError, TimeoutError, ValueError) as exc:
                raise ClusterError(f"could not start the {scale.cluster} Dask cluster: {type(exc).__name__}: {exc}") from None
            client = stack.enter_context(Client(cluster, timeout=timeout))
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise ClusterError(f"the Dask cluster at {client.scheduler.address} has no worker after {timeout:g} s "
                               "(scale.connect_timeout_s): start workers against its scheduler") from None
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
