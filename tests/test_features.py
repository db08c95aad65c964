"""Backbones, weights, and the Zarr feature store: resume after SIGKILL, append, failures, bad input."""

import dataclasses
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from aml_rapids.config import IndexConfig, load_config
from aml_rapids.data.manifest import build_manifest, write_manifest
from aml_rapids.data.splits import make_split
from aml_rapids.data.synthetic import write_demo_dataset
from aml_rapids.errors import AmlRapidsError, ConfigError, OutputError
from aml_rapids.features import extract as extract_module
from aml_rapids.features.backbones import REGISTRY
from aml_rapids.features.engines.torch_engine import compile_settings
from aml_rapids.features.extract import TIME_PARTS, extract, load_backbones
from aml_rapids.features.plan import STATUS_FAILED, STATUS_OK, STATUS_PADDING
from aml_rapids.features.store import FeatureStore, StoreError, StoreMismatch
from aml_rapids.features.weights import WeightsError, load_backbone

from conftest import REPO

SHARED_WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2-imagenet-qnnpack-dequant.pth"
TINY = {"features.backbones": "[{name: tiny, weights: none}]", "loader.batch_size": 16, "features.chunk_batches": 2,
        "loader.image_size": 32, "loader.device": "cpu", "loader.num_threads": 2,
        "features.engine": "torch", "features.precision": "fp32"}  # the loop's mechanics, on the reference engine


def cfg(**over):
    return load_config(None, [f"{k}={v}" for k, v in {**TINY, **over}.items()])


def demo_manifest(root: Path, patients=2, cells=9, split=True, seed=0):
    write_demo_dataset(root, patients, cells, seed=seed)
    manifest = build_manifest(root, IndexConfig(verify_decode=False)).manifest
    if split:
        manifest.table = make_split(manifest.table, load_config(None, ["split.method=image"]).split).table
    return manifest


def store_bytes(path: Path) -> dict[str, bytes]:
    group = zarr.open_group(str(path), mode="r")
    out = {}
    for name in ["features/tiny", *[f"rows/{f}" for f in group["rows"].array_keys()], "progress/chunk_done"]:
        values = group[name][:]
        out[name] = values.tobytes() if values.dtype != object and values.dtype.kind != "T" else str(list(values)).encode()
    return out


def chunk_checksums(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and "/c/" in str(p.relative_to(path)).replace("\\", "/")}


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet101", "vgg16", "vit_b_16", "tiny"])
def test_registry_dims(name):
    net, info = load_backbone(name, "none")
    size = REGISTRY[name].input_size or 64
    with torch.inference_mode():
        out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, REGISTRY[name].dim) and not info.pretrained and info.sha256 is None
    assert any(p.requires_grad for p in net.parameters())  # differentiable, ready for fine-tuning


def test_a_backbone_with_a_fixed_input_size_refuses_another(tmp_path):
    from aml_rapids.features.extract import load_backbones
    with pytest.raises(AmlRapidsError, match=r"vit_b_16 takes 224x224 images only; set loader.image_size=224 \(it is 32\)"):
        load_backbones(cfg(**{"features.backbones": "[{name: vit_b_16, weights: none}]"}), "cpu")


def test_weights_errors(tmp_path):
    with pytest.raises(AmlRapidsError, match="unknown backbone 'resnet9000'; known: .*mobilenet_v2"):
        load_backbone("resnet9000")
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone("tiny", str(tmp_path / "nope.pth"))
    torch.save({"state_dict": {"features.0.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"do not fit tiny: 1 shape mismatches \(first: features\.0\.weight"):
        load_backbone("tiny", str(tmp_path / "bad.pth"))
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_backbone("tiny", str(tmp_path / "text.pth"))


def test_a_cached_imagenet_file_that_is_not_torchvisions_is_refused(tmp_path, monkeypatch):
    """torchvision names each checkpoint by its sha256's first digits: a file of that name with other contents
    (a random state_dict saved there) would otherwise be used and reported as ImageNet weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    cached.parent.mkdir(parents=True)
    torch.save(REGISTRY["mobilenet_v2"].build().state_dict(), cached)
    with pytest.raises(WeightsError, match="is not torchvision's ImageNet checkpoint for mobilenet_v2.*b0353104"):
        load_backbone("mobilenet_v2", "imagenet")


def test_an_empty_backbone_list_is_refused():
    with pytest.raises(ConfigError, match="features.backbones"):
        load_config(None, ["features.backbones=[]"])


def test_a_fine_tuned_checkpoint_is_just_another_weights_source(tmp_path):
    net, _ = load_backbone("tiny", "none", seed=5)
    torch.manual_seed(5)
    full = REGISTRY["tiny"].build()
    torch.save({"model": {f"module.{k}": v for k, v in full.state_dict().items()}}, tmp_path / "ft.ckpt")
    loaded, info = load_backbone("tiny", str(tmp_path / "ft.ckpt"))
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), net(x))
    assert info.pretrained and len(info.sha256) == 64


def test_shared_imagenet_weights_load_with_their_published_sha():
    if not SHARED_WEIGHTS.is_file():
        pytest.skip("../shared/weights is absent")
    _, info = load_backbone("mobilenet_v2", str(SHARED_WEIGHTS))
    assert info.sha256 == "1ff56ae11972c2c1eaf77b11f82a69f148a4563328ce15d86fa143a72b753695"


def test_imagenet_offline_names_the_expected_file():
    from torchvision.models import get_weight
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(get_weight("ResNet101_Weights.IMAGENET1K_V1").url).name
    if cached.is_file():
        pytest.skip("ResNet-101 weights are cached here")
    with pytest.raises(WeightsError, match=f"not on this machine \\(looked at: .*; {cached}\\).*pass a local file"):
        load_backbone("resnet101", "imagenet")


def test_store_layout_readable_without_aml_rapids(tmp_path):
    manifest = demo_manifest(tmp_path / "data")
    summary = extract(manifest, tmp_path / "s.zarr", cfg())
    assert summary.rows_written == 90 and summary.rows_failed == 0
    assert tuple(summary.seconds_in) == TIME_PARTS and min(summary.seconds_in.values()) >= 0
    assert 0.95 * summary.seconds <= sum(summary.seconds_in.values()) <= summary.seconds  # every part accounted
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    status = group["rows/status"][:]
    feats = da.from_zarr(str(tmp_path / "s.zarr"), component="features/tiny").compute()
    assert feats.dtype == np.float16 and feats.shape[1] == 16 and feats.shape[0] % 32 == 0
    assert np.isfinite(feats[status == STATUS_OK]).all() and np.isnan(feats[status == STATUS_PADDING]).all()
    attrs = dict(group.attrs)["aml_rapids"]
    assert attrs["backbones"]["tiny"]["weights"].startswith("none") and attrs["manifests"][0]["digest"] == manifest.digest()
    assert "torch" in attrs["versions"] and attrs["device"] == "cpu"
    splits, real = group["rows/split"][:], status != STATUS_PADDING
    # every chunk's rows hold one split only, so every split starts on a chunk boundary; padding rows hold none
    assert all(len(set(chunk[mine])) == 1 for chunk, mine in zip(splits.reshape(-1, 32), real.reshape(-1, 32)))
    assert set(splits[~real]) == {""} and "" not in set(splits[real])
    assert set(group["rows/cell_id"][:][status == STATUS_OK]) == set(manifest.table["cell_id"])


def test_only_the_chunks_in_flight_are_held_in_memory(tmp_path, monkeypatch):
    alive, alive_at_creation = weakref.WeakSet(), []

    class Counted(extract_module._ChunkBuffer):
        def __init__(self, *args):
            super().__init__(*args)
            alive.add(self)
            alive_at_creation.append(len(alive))

    monkeypatch.setattr(extract_module, "_ChunkBuffer", Counted)
    extract(demo_manifest(tmp_path / "data", patients=4, split=False), tmp_path / "s.zarr", cfg())  # one pass
    chunks = FeatureStore.open(tmp_path / "s.zarr").n_chunks
    assert chunks >= 5 and len(alive_at_creation) == chunks and max(alive_at_creation) <= 2


def test_preloaded_backbones_padded_to_one_shape_give_the_same_store(tmp_path):
    """What a compiled run does: networks loaded once, every batch padded to the batch size (90 cells in
    batches of 16 leave short batches); the features are those of an ordinary run."""
    manifest = demo_manifest(tmp_path / "data")
    config = cfg(**{"features.store_dtype": "float32"})
    extract(manifest, tmp_path / "plain.zarr", config)
    padded = dataclasses.replace(load_backbones(config, "cpu"), batch_size=16)
    summary = extract(manifest, tmp_path / "padded.zarr", config, backbones=padded)
    assert summary.rows_written == 90 and summary.rows_failed == 0
    plain, other = (FeatureStore.open(tmp_path / f"{n}.zarr") for n in ("plain", "padded"))
    assert plain.rows().equals(other.rows())
    np.testing.assert_allclose(other.features("tiny")[:], plain.features("tiny")[:], rtol=1e-5, atol=1e-5)


def test_the_compile_mode_reaches_torch_compile(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda net, **kwargs: calls.append(kwargs) or net)
    load_backbones(cfg(**{"features.compile": "true", "features.compile_mode": "reduce-overhead"}), "cpu")
    assert calls == [{"dynamic": False, "options": {"triton.cudagraphs": True, "freezing": True}}]
    assert compile_settings("reduce-overhead", "cuda") == {"mode": "reduce-overhead"}  # a GPU: the mode alone
    assert compile_settings("default", "cpu") == {"options": {"freezing": True}}


@pytest.mark.slow
def test_a_compiled_extraction_on_the_cpu_gives_the_eager_features(tmp_path):
    """torch.compile on a CPU (weights frozen in, every batch padded to one shape) changes speed, not features."""
    manifest = demo_manifest(tmp_path / "data")
    eager = cfg(**{"features.store_dtype": "float32"})
    compiled = cfg(**{"features.store_dtype": "float32", "features.compile": "true"})
    extract(manifest, tmp_path / "eager.zarr", eager)
    prepared = load_backbones(compiled, "cpu")
    assert all(runner.batch_size == 16 for runner in prepared.nets.values())  # compiled: one batch shape
    extract(manifest, tmp_path / "compiled.zarr", compiled, backbones=prepared)
    plain, other = (FeatureStore.open(tmp_path / f"{n}.zarr") for n in ("eager", "compiled"))
    assert plain.rows().equals(other.rows())
    np.testing.assert_allclose(other.features("tiny")[:], plain.features("tiny")[:], rtol=1e-4, atol=1e-4)


def test_oversampled_training_copies_are_augmented_and_distinct(tmp_path):
    manifest = demo_manifest(tmp_path / "data", patients=2, cells=6)
    keep = ~((manifest.table["label"] == "NPM1") & (manifest.table["split"] == "train")) | (
        manifest.table.groupby(["label", "split"]).cumcount() < 2)
    manifest.table = manifest.table[keep].reset_index(drop=True)
    extract(manifest, tmp_path / "s.zarr", cfg())
    store = FeatureStore.open(tmp_path / "s.zarr")
    rows = store.rows()
    train = rows[(rows["split"] == "train") & (rows["status"] == STATUS_OK)]
    assert train["label"].value_counts().nunique() == 1 and train["augment"].all()
    assert not rows.loc[rows["split"].isin(["val", "test"]), "augment"].any()
    copies = train[train.duplicated("cell_id", keep=False)]
    feats = store.features("tiny")[:][copies.index]
    assert len(copies) and len(np.unique(feats, axis=0)) == len(copies)


def _kill_midway(args, store: Path, rng: random.Random) -> None:
    """Start an extraction in a subprocess and SIGKILL it after a random number of finished chunks."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target, deadline = rng.randint(1, 6), time.time() + 120
    marks = store / "progress" / "chunk_done" / "c"
    while time.time() < deadline and proc.poll() is None:
        if marks.is_dir() and len(list(marks.iterdir())) >= target:
            time.sleep(rng.uniform(0, 0.15))
            break
        time.sleep(0.01)
    assert proc.poll() is None, "extraction finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    manifest = demo_manifest(tmp_path / "data", patients=4, cells=20)
    write_manifest(manifest, tmp_path / "m.parquet")
    config = cfg(**{"loader.image_size": 96})
    extract(manifest, tmp_path / "whole.zarr", config)
    expected = store_bytes(tmp_path / "whole.zarr")
    rng = random.Random(7)
    overrides = sum((["--set", f"{k}={v}"] for k, v in {**TINY, "loader.image_size": 96}.items()), [])
    for trial in range(3):
        store = tmp_path / f"killed{trial}.zarr"
        _kill_midway([sys.executable, "-m", "aml_rapids", "extract", str(tmp_path / "m.parquet"),
                      "--store", str(store), *overrides], store, rng)
        done_before = FeatureStore.open(store).done_chunks()
        assert 0 < done_before.sum() < len(done_before)
        summary = extract(manifest, store, config)
        assert summary.rows_skipped > 0 and summary.rows_appended == 0
        assert store_bytes(store) == expected


def test_append_new_cohort_leaves_existing_chunks_untouched(tmp_path):
    first = demo_manifest(tmp_path / "data", patients=2, cells=5, split=False)
    extract(first, tmp_path / "s.zarr", cfg())
    before = chunk_checksums(tmp_path / "s.zarr")
    rows_before = FeatureStore.open(tmp_path / "s.zarr").summary()["ok"]
    write_demo_dataset(tmp_path / "data", patients_per_class=3, cells_per_patient=5, seed=0)
    both = build_manifest(tmp_path / "data", IndexConfig(verify_decode=False)).manifest
    summary = extract(both, tmp_path / "s.zarr", cfg())
    after = chunk_checksums(tmp_path / "s.zarr")
    changed = [k for k in before if before[k] != after.get(k)]
    assert changed == [] and len(after) > len(before)
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert summary.rows_appended == len(both.table) - len(first.table) == 25
    assert store.summary()["ok"] == rows_before + 25
    assert summary.rows_written == 25 and summary.rows_skipped == rows_before
    assert len(store.meta["manifests"]) == 2
    again = extract(both, tmp_path / "s.zarr", cfg())
    assert again.rows_appended == 0 and again.rows_written == 0


def test_changed_files_fail_their_rows_and_the_store_stays_consistent(tmp_path):
    manifest = demo_manifest(tmp_path / "data", split=False)
    manifest.paths()[3].write_bytes(b"gone bad")
    summary = extract(manifest, tmp_path / "s.zarr", cfg())
    assert summary.rows_failed == 1 and "changed since indexing" in summary.failures[0].reason
    store = FeatureStore.open(tmp_path / "s.zarr")
    rows = store.rows()
    bad = rows.index[rows["cell_id"] == manifest.table["cell_id"][3]][0]
    assert rows["status"][bad] == STATUS_FAILED and np.isnan(store.features("tiny")[bad]).all()
    assert store.done_chunks().all()


def test_mismatched_config_and_bad_stores_are_refused(tmp_path):
    manifest = demo_manifest(tmp_path / "data", split=False)
    extract(manifest, tmp_path / "s.zarr", cfg())
    with pytest.raises(StoreMismatch, match="another configuration.*preprocess.segmentation"):
        extract(manifest, tmp_path / "s.zarr", cfg(**{"segmentation.enabled": "false"}))
    with pytest.raises(StoreMismatch, match="another configuration.*backbones"):
        extract(manifest, tmp_path / "s.zarr", cfg(**{"features.seed": 1, "features.backbones":
                                                      "[{name: tiny, weights: none}, {name: mobilenet_v2, weights: none}]"}))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(StoreError, match="not an aml-rapids feature store"):
        FeatureStore.open(tmp_path / "other.zarr")
    with pytest.raises(StoreError, match="has no features for backbone 'vgg16'"):
        FeatureStore.open(tmp_path / "s.zarr").features("vgg16")


def test_unwritable_store_location(tmp_path):
    manifest = demo_manifest(tmp_path / "data", split=False)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(OutputError, match="store folder .*a_file: .*a_file is a file, not a folder"):
        extract(manifest, tmp_path / "a_file" / "s.zarr", cfg())


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_folder(tmp_path):
    manifest = demo_manifest(tmp_path / "data", split=False)
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    with pytest.raises(OutputError, match="store folder .*ro cannot be written"):
        extract(manifest, tmp_path / "ro" / "s.zarr", cfg())


def test_resuming_with_a_manifest_that_lacks_pending_cells_names_the_problem(tmp_path):
    from aml_rapids.features.extract import load_backbones, open_or_extend, store_identity
    manifest = demo_manifest(tmp_path / "data", split=False)
    config = cfg()
    identity = store_identity(config, load_backbones(config, "cpu"))
    open_or_extend(tmp_path / "s.zarr", manifest, config, identity, "cpu")  # laid out, nothing computed yet
    manifest.table = manifest.table.iloc[:5]
    with pytest.raises(StoreError, match="does not list .*resume with the manifest they came from"):
        extract(manifest, tmp_path / "s.zarr", config)


def test_a_failed_chunk_write_stops_the_run_and_a_rerun_completes_it(tmp_path, monkeypatch):
    manifest = demo_manifest(tmp_path / "data", patients=2, cells=10, split=False)
    extract(manifest, tmp_path / "whole.zarr", cfg())
    real_write = FeatureStore.write_chunk

    def disk_full_at_chunk_2(self, k, features, status):
        if k == 2:
            raise OSError(28, "No space left on device")
        real_write(self, k, features, status)

    monkeypatch.setattr(FeatureStore, "write_chunk", disk_full_at_chunk_2)
    with pytest.raises(OutputError, match=r"could not write chunk 2 of .*No space left on device"):
        extract(manifest, tmp_path / "s.zarr", cfg())
    monkeypatch.undo()
    done = FeatureStore.open(tmp_path / "s.zarr").done_chunks()
    assert done[:2].all() and not done[2]  # the chunks before the failure are kept, the failed one is not
    summary = extract(manifest, tmp_path / "s.zarr", cfg())
    assert summary.rows_skipped == 2 * 32 and store_bytes(tmp_path / "s.zarr") == store_bytes(tmp_path / "whole.zarr")
