"""Dask scale-out (aml_rapids/scale): extraction by units of whole chunks on a local cluster of 2 worker processes
gives the single-process store byte for byte, a killed worker loses only its unit, the fits on Dask give the
threaded model, and every cluster that cannot be had is a clear error."""

import importlib.util
import json
from collections import Counter
import os
import socket
import sys
from pathlib import Path

import cloudpickle
import dask
import numpy as np
import pytest
from distributed import LocalCluster, WorkerPlugin

from aml_rapids import workflow
from aml_rapids.classify.backend import Backend
from aml_rapids.classify.data import feature_blocks
from aml_rapids.classify.io import load_model
from aml_rapids.classify.model import FeatureStackingClassifier
from aml_rapids.config import ScaleConfig, load_config
from aml_rapids.data.manifest import write_manifest
from aml_rapids.errors import BusyError, ClusterError, ConfigError
from aml_rapids.features.extract import extract, load_backbones, loader_passes
from aml_rapids.features.lock import StoreLock, check_lease, lock_path
from aml_rapids.features.store import FeatureStore
from aml_rapids.scale import cluster as cluster_module
from aml_rapids.scale import extract as scale_extract
from aml_rapids.scale.cluster import dask_client
from aml_rapids.scale.extract import Unit, extract_sharded, extract_unit
from aml_rapids.scale.fits import fits_on
from aml_rapids.scale.reduce import covariance_pca

from test_features import cfg, demo_manifest, store_bytes

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker plugin below, on the workers
TWO_WORKERS = {"scale.cluster": "local", "scale.workers": 2, "scale.memory_per_worker": "3GiB"}


@pytest.fixture(scope="module")
def client():
    """One cluster for the module: the stages of these tests with TWO_WORKERS' settings join it."""
    with dask_client(cfg(**TWO_WORKERS).scale) as connected:
        yield connected


def test_two_workers_write_the_single_process_store_byte_for_byte(tmp_path, client):
    manifest = demo_manifest(tmp_path / "data", patients=3, cells=14)
    write_manifest(manifest, tmp_path / "manifest.parquet")
    extract(manifest, tmp_path / "one.zarr", cfg())
    result = workflow.extract(tmp_path / "manifest.parquet", tmp_path / "two.zarr", cfg(**TWO_WORKERS))
    assert store_bytes(tmp_path / "two.zarr") == store_bytes(tmp_path / "one.zarr")
    # the per-chunk writer record: every chunk written once, by the worker its unit went to, both workers busy
    store = FeatureStore.open(tmp_path / "two.zarr")
    written = [k for unit in result.units for k in unit["written"]]
    assert sorted(written) == list(range(store.n_chunks))
    assert all(unit["written"] == unit["chunks"] for unit in result.units)
    assert len({unit["worker"] for unit in result.units}) == 2
    record = json.loads(next((tmp_path / "runs").glob("*-extract.json")).read_text())
    assert [u["written"] for u in record["details"]["units"]] == [u["written"] for u in result.units]
    # resumed with nothing left: no unit at all
    again = workflow.extract(tmp_path / "manifest.parquet", tmp_path / "two.zarr", cfg(**TWO_WORKERS))
    assert again.rows_written == 0 and again.units == [] and again.rows_skipped == result.rows_written


def test_loader_passes_end_at_padded_chunks_so_units_see_one_process_batches():
    augment = np.array([True, True, True, False, False, False, False])
    padded = np.array([False, False, True, False, True, False, True])  # train ends at 2, val at 4, test at 6
    assert loader_passes(list(range(7)), augment, padded) == [[0, 1, 2], [3, 4], [5, 6]]
    assert loader_passes([0, 2, 3, 5], augment, padded) == [[0], [2], [3], [5]]


class DieAfterFirstChunk(WorkerPlugin):
    """Kills its worker process (as the kernel's OOM killer would) right after it has written one chunk, once:
    the marker file says it already happened."""

    def __init__(self, marker: str):
        self.marker = marker

    def setup(self, worker):
        from aml_rapids.features.store import FeatureStore

        original, marker = FeatureStore.write_chunk, self.marker

        def write_then_die(store, k, features, status):
            original(store, k, features, status)
            if not os.path.exists(marker):
                Path(marker).write_text(str(k))
                os._exit(9)

        FeatureStore.write_chunk = write_then_die


class DieLoadingNetworks(WorkerPlugin):
    """Kills its worker while it loads the networks, as an out-of-memory kill would."""

    def setup(self, worker):
        import aml_rapids.scale.extract as on_worker

        on_worker.load_backbones = lambda *args, **kwargs: os._exit(9)


@pytest.mark.parametrize("retries", [0, 3], ids=["job-fails-then-resumes", "dask-retries-the-unit"])
def test_a_worker_killed_mid_unit_loses_only_its_unit(tmp_path, retries):
    manifest = demo_manifest(tmp_path / "data", patients=3, cells=14)
    config = cfg(**{**TWO_WORKERS, "scale.unit_chunks": 3})
    extract(manifest, tmp_path / "one.zarr", cfg())
    marker = tmp_path / "killed-after-chunk"
    with dask.config.set({"distributed.scheduler.allowed-failures": retries}):
        with dask_client(config.scale) as connected:
            connected.register_plugin(DieAfterFirstChunk(str(marker)))
            if retries == 0:
                with pytest.raises(ClusterError, match="rerun to resume"):
                    extract_sharded(connected, manifest, tmp_path / "two.zarr", config)
                assert marker.exists()
                done = FeatureStore.open(tmp_path / "two.zarr").done_chunks()
                assert 0 < done.sum() < len(done)  # the chunk written before the kill is kept
            summary = extract_sharded(connected, manifest, tmp_path / "two.zarr", config)
    killed = int(marker.read_text())
    assert store_bytes(tmp_path / "two.zarr") == store_bytes(tmp_path / "one.zarr")
    written = [k for unit in summary.units for k in unit["written"]]
    assert len(written) == len(set(written)) and killed not in written  # no chunk written twice
    if retries:  # the retried unit computed only what the dead worker had not written
        unit = next(u for u in summary.units if killed in u["chunks"])
        assert unit["written"] == [k for k in unit["chunks"] if k != killed]
        assert sorted(written + [killed]) == list(range(FeatureStore.open(tmp_path / "two.zarr").n_chunks))


def test_the_dask_fits_give_the_threaded_models_predictions(client):
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(c, 2.0, (40, 24)) for c in range(3)]).astype(np.float32)
    y = np.repeat(["a", "b", "c"], 40)
    options = dict(block_dims=(16, 8), pca_components=6, rf_trees=20, folds=3, backend="sklearn")
    threaded = FeatureStackingClassifier(**options).fit(X[::2], y[::2])
    with fits_on(client, load_config(None, ["scale.cluster=local"])) as on_cluster:
        assert on_cluster.classify.n_jobs == 2  # every fit submitted at once
        import joblib

        assert joblib.parallel.get_active_backend()[0].__class__.__name__ == "DaskDistributedBackend"
        distributed = FeatureStackingClassifier(**options, n_jobs=on_cluster.classify.n_jobs).fit(X[::2], y[::2])
    held_out = X[1::2]
    assert np.array_equal(distributed.predict_proba(held_out), threaded.predict_proba(held_out))
    assert np.array_equal(distributed.oof_, threaded.oof_)


def test_pca_on_the_cluster_is_scikit_learns_covariance_eigh(client):
    import dask.array as da
    from sklearn.decomposition import PCA

    X = np.random.default_rng(1).normal(size=(300, 40)).astype(np.float32) * np.linspace(0.2, 3, 40)
    [pca] = covariance_pca([da.from_array(X, chunks=(64, 40))], [6])
    reference = PCA(6, svd_solver="covariance_eigh").fit(X)
    assert np.allclose(pca.components_, reference.components_, atol=1e-4)
    assert np.allclose(pca.explained_variance_ratio_, reference.explained_variance_ratio_, rtol=1e-4)
    assert np.allclose(pca.transform(X), reference.transform(X), atol=1e-3)
    assert np.isclose(pca.noise_variance_, reference.noise_variance_, rtol=1e-4)


def test_training_features_past_memory_are_reduced_on_the_cluster(tmp_path, client, monkeypatch):
    manifest = demo_manifest(tmp_path / "data", patients=3, cells=14)
    extract(manifest, tmp_path / "s.zarr", cfg())
    small = {**TWO_WORKERS, "classify.pca_components": 4, "classify.rf_trees": 10, "classify.folds": 2,
             "classify.backend": "sklearn"}
    result = workflow.train(tmp_path / "s.zarr", tmp_path / "model", cfg(**{**small, "classify.memory_gb": 1e-6}))
    assert result.info["reduction"].startswith("PCA on the Dask cluster")
    # the same model in memory, its PCAs fitted by scikit-learn's covariance solver: the same predictions
    monkeypatch.setattr(Backend, "pca_options", lambda self, seed: {"svd_solver": "covariance_eigh"})
    in_memory = workflow.train(tmp_path / "s.zarr", tmp_path / "memory", cfg(**{**small, "scale.cluster": "none"}))
    assert in_memory.info["reduction"] == "PCA in memory"
    store = FeatureStore.open(tmp_path / "s.zarr")
    X = np.concatenate(list(feature_blocks(store, ["tiny"], store.rows()["status"].to_numpy() == 1)))
    on_cluster, local = load_model(tmp_path / "model")[0], load_model(tmp_path / "memory")[0]
    assert np.allclose(on_cluster.predict_proba(X), local.predict_proba(X), atol=1e-3)


def test_a_second_job_on_a_locked_store_is_refused_before_any_cluster(tmp_path, monkeypatch):
    manifest = demo_manifest(tmp_path / "data", patients=2, cells=5)
    monkeypatch.setattr(scale_extract, "dask_client", lambda scale: pytest.fail("a cluster was started"))
    with StoreLock(tmp_path / "s.zarr", job="dask-other"):
        with pytest.raises(BusyError, match="being written by another process"):
            extract(manifest, tmp_path / "s.zarr", cfg(**TWO_WORKERS))
        # a worker of another job (one that has stopped, say) drops its unit before writing anything
        with pytest.raises(BusyError, match="no longer held for Dask job dask-mine"):
            extract_unit(manifest, str(tmp_path / "s.zarr"), cfg(), "dask-mine", Unit(0, [0]))
    with pytest.raises(BusyError, match="no longer held by any job"):
        extract_unit(manifest, str(tmp_path / "s.zarr"), cfg(), "dask-mine", Unit(0, [0]))
    # a coordinator killed with SIGKILL leaves its record, not its lock: its workers stop all the same
    lock_path(tmp_path / "s.zarr").write_text(json.dumps({"host": "h", "pid": 1, "argv": [], "since": "",
                                                          "job": "dask-mine"}))
    with pytest.raises(BusyError, match="no longer held by any job"):
        check_lease(tmp_path / "s.zarr", "dask-mine")
    # a worker that cannot see the coordinator's lock (node-local locks) is found before any work
    with pytest.raises(ClusterError, match="file system's locks are local to each node"):
        scale_extract.describe_backbones(manifest, cfg(), None, str(tmp_path / "s.zarr"), "dask-mine")


def test_predict_runs_where_it_is_asked_not_on_the_cluster_the_store_was_made_on(tmp_path):
    """A model's store made on a cluster (here a scheduler file long gone) predicts new images in this process
    unless predict itself is given a cluster."""
    manifest = demo_manifest(tmp_path / "data", patients=3, cells=8)
    made_on = cfg(**{"scale.cluster": "scheduler-file", "scale.scheduler_file": str(tmp_path / "gone.json")})
    extract(manifest, tmp_path / "s.zarr", made_on, backbones=load_backbones(made_on, "cpu"))
    small = {"classify.pca_components": 4, "classify.rf_trees": 5, "classify.folds": 2, "classify.backend": "sklearn"}
    workflow.train(tmp_path / "s.zarr", tmp_path / "model", cfg(**small))
    predicted = workflow.predict(tmp_path / "model", tmp_path / "data", tmp_path / "new")
    assert predicted.cells > 0 and (tmp_path / "new" / "predictions.csv").is_file()
    with pytest.raises(ClusterError, match="gone.json does not exist"):  # asked for: the cluster it names
        workflow.predict(tmp_path / "model", tmp_path / "data", tmp_path / "again",
                         overrides=["scale.cluster=scheduler-file", f"scale.scheduler_file={tmp_path / 'gone.json'}"])


def test_a_paused_worker_is_named_not_waited_for():
    class Paused:
        def scheduler_info(self, n_workers):
            return {"workers": {"tcp://10.0.0.7:4000": {"status": "paused", "memory_limit": 2**29},
                                "tcp://10.0.0.8:4000": {"status": "running", "memory_limit": 2**29}}}

    seen = Counter()
    for _ in range(scale_extract.PAUSED_POLLS - 1):  # a pause that passes is waited out
        scale_extract._refuse_paused(Paused(), seen)
    with pytest.raises(ClusterError, match=r"paused worker tcp://10.0.0.7:4000: .* limit of 0.50 GiB"):
        scale_extract._refuse_paused(Paused(), seen)


def test_workers_dying_while_loading_the_networks_is_exit_13(tmp_path):
    manifest = demo_manifest(tmp_path / "data", patients=2, cells=5)
    config = cfg(**{**TWO_WORKERS, "scale.workers": 1})
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with dask_client(config.scale) as connected:
            connected.register_plugin(DieLoadingNetworks())
            with pytest.raises(ClusterError, match="workers loading the networks .* died too often"):
                extract_sharded(connected, manifest, tmp_path / "s.zarr", config)
    assert not (tmp_path / "s.zarr").exists()  # nothing made before the networks were known


def test_a_worker_too_small_for_a_unit_is_refused_before_any_work(tmp_path, client):
    manifest = demo_manifest(tmp_path / "data", patients=2, cells=5)
    big_batches = cfg(**{**TWO_WORKERS, "loader.batch_size": 2048, "loader.image_size": 224})
    with pytest.raises(ClusterError, match=r"needs about \d+\.\d GiB on a worker .* may use 3\.0 GiB"):
        extract_sharded(client, manifest, tmp_path / "s.zarr", big_batches)
    assert not (tmp_path / "s.zarr").exists()


def test_clusters_that_cannot_be_had_are_clear_errors(tmp_path, monkeypatch):
    missing = tmp_path / "scheduler.json"
    with pytest.raises(ClusterError, match=f"scheduler file {missing} does not exist"):
        with dask_client(ScaleConfig(cluster="scheduler-file", scheduler_file=str(missing))):
            pass
    missing.write_text("{not json")
    with pytest.raises(ClusterError, match="names no scheduler address"):
        with dask_client(ScaleConfig(cluster="scheduler-file", scheduler_file=str(missing))):
            pass
    missing.write_text(json.dumps({"address": "tcp://127.0.0.1:9"}))  # nothing listens there
    with pytest.raises(ClusterError, match=r"no Dask scheduler answered at tcp://127.0.0.1:9 .* within 1 s"):
        with dask_client(ScaleConfig(cluster="scheduler-file", scheduler_file=str(missing), connect_timeout_s=1)):
            pass
    for address in ("nonsense", 5):
        missing.write_text(json.dumps({"address": address}))
        with pytest.raises(ClusterError, match="names no scheduler address"):
            with dask_client(ScaleConfig(cluster="scheduler-file", scheduler_file=str(missing))):
                pass
    with pytest.raises(ClusterError, match="is a folder"):
        with dask_client(ScaleConfig(cluster="scheduler-file", scheduler_file=str(tmp_path))):
            pass
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers: not a Dask scheduler
        missing.write_text(json.dumps({"address": f"tcp://127.0.0.1:{silent.getsockname()[1]}"}))
        with pytest.raises(ClusterError, match="answered as a Dask scheduler .* within 1 s|no Dask scheduler answered"):
            with dask_client(ScaleConfig(cluster="scheduler-file", scheduler_file=str(missing), connect_timeout_s=1)):
                pass
    with pytest.raises(ConfigError, match="needs scale.scheduler_file"):
        load_config(None, ["scale.cluster=scheduler-file"])
    with pytest.raises(ConfigError, match="'banana' is neither auto nor a size"):
        load_config(None, ["scale.memory_per_worker=banana"])
    monkeypatch.setattr(cluster_module.shutil, "which", lambda name: None)  # no SLURM here
    if importlib.util.find_spec("dask_jobqueue"):
        with pytest.raises(ClusterError, match="submits its workers with sbatch, which is not on PATH"):
            with dask_client(ScaleConfig(cluster="slurm")):
                pass
    monkeypatch.setattr(cluster_module, "visible_gpus", lambda: 0)
    with pytest.raises(ClusterError, match="no CUDA GPU is visible"):
        with dask_client(ScaleConfig(cluster="local-cuda")):
            pass
    monkeypatch.setattr(cluster_module, "visible_gpus", lambda: 2)
    with pytest.raises(ClusterError, match=r"scale.workers=4, but 2 GPU\(s\) are visible"):
        with dask_client(ScaleConfig(cluster="local-cuda", workers=4)):
            pass
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as where it is not installed
    with pytest.raises(ClusterError, match=r"needs dask-jobqueue: pip install 'aml-rapids\[slurm\]'"):
        with dask_client(ScaleConfig(cluster="slurm")):
            pass


def test_slurm_jobs_run_a_dask_cuda_worker_per_gpu():
    pytest.importorskip("dask_jobqueue")
    scale = load_config(None, ["scale.cluster=slurm", "scale.slurm.gpus=4", "scale.slurm.cores=32",
                               "scale.slurm.memory=256GiB", "scale.slurm.queue=gpu",
                               "scale.slurm.job_extra_directives=['--constraint=a100']"]).scale
    with cluster_module.slurm_cluster(scale) as cluster:
        script = cluster.job_script()
    assert "#SBATCH --gres=gpu:4" in script and "#SBATCH --constraint=a100" in script and "#SBATCH -p gpu" in script
    worker = next(line for line in script.splitlines() if " -m dask_cuda.cli " in line)
    assert "--nthreads 8" in worker and "--memory-limit 64.00GiB" in worker  # each GPU's share of the job


def test_a_scheduler_file_joins_a_running_cluster(tmp_path):
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as running:
        path = tmp_path / "scheduler.json"
        path.write_text(json.dumps({"address": running.scheduler_address}))
        with dask_client(ScaleConfig(cluster="scheduler-file", scheduler_file=str(path))) as joined:
            assert len(joined.scheduler_info(n_workers=-1)["workers"]) == 1
            # a stage inside it with the same settings shares the connection
            with dask_client(ScaleConfig(cluster="scheduler-file", scheduler_file=str(path))) as inner:
                assert inner is joined


@pytest.mark.gpu
def test_local_cuda_gives_the_single_process_gpu_features(tmp_path):
    """On a GPU machine: one dask-cuda worker per GPU writes the features one process writes on its GPU (cuDNN
    may pick other convolution algorithms in another process, so equal to within float16 storage, not bytes)."""
    import torch

    pytest.importorskip("dask_cuda")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    manifest = demo_manifest(tmp_path / "data", patients=3, cells=14)
    gpu = {"loader.device": "gpu", "features.precision": "bf16"}
    extract(manifest, tmp_path / "one.zarr", cfg(**gpu))
    write_manifest(manifest, tmp_path / "manifest.parquet")
    workflow.extract(tmp_path / "manifest.parquet", tmp_path / "two.zarr", cfg(**gpu, **{"scale.cluster": "local-cuda"}))
    one, two = FeatureStore.open(tmp_path / "one.zarr"), FeatureStore.open(tmp_path / "two.zarr")
    assert np.array_equal(one.read("rows/status"), two.read("rows/status"))
    a, b = one.features("tiny")[:], two.features("tiny")[:]
    ok = ~np.isnan(a).any(axis=1)
    assert np.allclose(a[ok], b[ok], rtol=1e-2, atol=1e-3)

