"""Checks that need a CUDA GPU (and, for the classifier, cuML); each skips where that is missing. On a GPU
machine: `python -m pytest -m gpu` (after `source .carry/install.sh`, see ../shared/gpu/README.md)."""

import joblib
import numpy as np
import pytest
import torch

from aml_rapids.classify.model import FeatureStackingClassifier
from aml_rapids.config import IndexConfig, load_config
from aml_rapids.data.manifest import build_manifest
from aml_rapids.data.synthetic import write_demo_dataset
from aml_rapids.features.extract import extract
from aml_rapids.features.store import FeatureStore

pytestmark = pytest.mark.gpu

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def needs_cuml():
    pytest.importorskip("cuml")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


def separable(rows=2000, classes=5, dim=64, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    return (rng.normal(0, 3, (classes, dim))[y] + rng.normal(0, 1, (rows, dim))).astype(np.float32), y.astype(str)


@needs_gpu
@pytest.mark.parametrize("backbone", ["mobilenet_v2", "dinobloom_s"])  # a torchvision CNN and a timm ViT-S/14
def test_gpu_extraction_matches_the_cpu_store(tmp_path, backbone):
    write_demo_dataset(tmp_path / "cells", 1, 40)
    manifest = build_manifest(tmp_path / "cells", IndexConfig(verify_decode=False)).manifest
    stores = {}
    for device in ("cpu", "gpu"):
        cfg = load_config(None, [f"features.backbones=[{{name: {backbone}, weights: none}}]", "loader.batch_size=64",
                                 "features.chunk_batches=1", f"loader.device={device}", "features.store_dtype=float32"])
        summary = extract(manifest, tmp_path / f"{device}.zarr", cfg)
        assert summary.rows_written == 200 and summary.rows_failed == 0
        stores[device] = FeatureStore.open(tmp_path / f"{device}.zarr").features(backbone)[:200]
    cpu, gpu = stores["cpu"], stores["gpu"]  # fp32 on the CPU, bf16 autocast on the GPU
    cosine = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cosine.min() > 0.98


@needs_gpu
def test_cuda_graph_extraction_gives_the_eager_features(tmp_path):
    """``reduce-overhead`` replays each network as a CUDA graph over the same output memory, while the host reads
    a batch's features only after the next batch is launched: outputs overwritten too early would show here."""
    write_demo_dataset(tmp_path / "cells", 2, 40)
    manifest = build_manifest(tmp_path / "cells", IndexConfig(verify_decode=False)).manifest
    stores = {}
    cuda_graphs = ["features.compile=true", "features.compile_mode=reduce-overhead"]
    for name, compiled in (("eager", []), ("graphs", cuda_graphs)):
        cfg = load_config(None, ["features.backbones=[{name: mobilenet_v2, weights: none}]", "loader.batch_size=64",
                                 "features.chunk_batches=1", "loader.device=gpu", "features.store_dtype=float32",
                                 *compiled])
        assert extract(manifest, tmp_path / f"{name}.zarr", cfg).rows_written == 400  # 7 batches, the last padded
        stores[name] = FeatureStore.open(tmp_path / f"{name}.zarr").features("mobilenet_v2")[:400]
    eager, graphs = stores["eager"], stores["graphs"]
    cosine = (eager * graphs).sum(1) / np.linalg.norm(eager, axis=1) / np.linalg.norm(graphs, axis=1)
    assert cosine.min() > 0.999


def test_cuml_and_scikit_learn_models_agree():
    needs_cuml()
    X, y = separable()
    models = {b: FeatureStackingClassifier(block_dims=(64,), pca_components=16, rf_trees=50, folds=3,
                                           backend=b).fit(X[:1500], y[:1500]) for b in ("cuml", "sklearn")}
    predicted = {b: m.predict(X[1500:]) for b, m in models.items()}
    assert (predicted["cuml"] == predicted["sklearn"]).mean() >= 0.99


def test_cuml_base_learners_fitted_on_threads_give_the_model_fitted_one_at_a_time():
    needs_cuml()
    X, y = separable()
    X += np.random.default_rng(1).normal(0, 4, X.shape).astype(np.float32)  # overlapping classes
    models = {jobs: FeatureStackingClassifier(block_dims=(64,), pca_components=16, rf_trees=50, folds=3,
                                              backend="cuml", n_jobs=jobs).fit(X[:1500], y[:1500])
              for jobs in (1, 4)}
    oof = {jobs: model.oof_.get() for jobs, model in models.items()}
    np.testing.assert_allclose(oof[4][:, :5], oof[1][:, :5], atol=1e-3)  # the SVMs' out-of-fold scores
    assert (models[4].predict(X[1500:]) == models[1].predict(X[1500:])).mean() >= 0.99


@pytest.mark.parametrize("classes", [2, 5])
def test_a_cuml_model_has_a_scikit_learn_twin_that_predicts_as_it_does(classes, tmp_path):
    needs_cuml()
    X, y = separable(classes=classes)
    model = FeatureStackingClassifier(block_dims=(64,), pca_components=16, rf_trees=50, folds=3,
                                      backend="cuml").fit(X[:1500], y[:1500])
    joblib.dump(model.to_sklearn(), tmp_path / "twin.joblib")
    twin = joblib.load(tmp_path / "twin.joblib")
    assert twin.backend_ == "sklearn"
    held = model.predict_proba(X[1500:])
    assert (twin.predict_proba(X[1500:]).argmax(1) == held.argmax(1)).mean() >= 0.99
    # multiclass SVC scores come from scikit-learn's one-vs-one code on both sides: same columns, same values
    assert np.allclose(twin.predict_proba(X[1500:]), held, atol=1e-2)


@needs_gpu
def test_gpu_fine_tuning_trains_in_bf16_and_resumes_exactly(tmp_path):
    """The GPU path of ``finetune``: DALI on the device, bf16 autocast, channels_last; the loss falls, the head is
    evaluated, and a run stopped at max_steps then resumed ends where an uninterrupted one does."""
    import pandas as pd

    import json

    from aml_rapids.data.manifest import read_manifest, write_manifest
    from aml_rapids.data.splits import make_split
    from aml_rapids.features.weights import build_network
    from aml_rapids.finetune.train import finetune

    write_demo_dataset(tmp_path / "cells", 4, 12, seed=2)
    built = build_manifest(tmp_path / "cells", IndexConfig(verify_decode=False)).manifest
    built.table = make_split(built.table, load_config().split).table
    built.meta["split"] = {"method": "patient", "seed": 0}
    write_manifest(built, tmp_path / "m.parquet")
    settings = ["finetune.backbone=mobilenet_v2", "finetune.weights=none", "finetune.lr=0.001", "finetune.epochs=3",
                "finetune.val_every=5", "loader.device=gpu", "evaluate.bootstrap_samples=10"]
    manifest = read_manifest(tmp_path / "m.parquet")
    whole = finetune(manifest, tmp_path / "m.parquet", tmp_path / "whole", load_config(None, settings))
    steps = pd.read_csv(tmp_path / "whole" / "steps.csv")
    assert whole.status == "finished 3 epochs" and steps["train_loss"].tail(5).mean() < steps["train_loss"].head(5).mean()
    assert whole.head_test["cell_level"]["n"] == (built.table["split"] == "test").sum()
    finetune(manifest, tmp_path / "m.parquet", tmp_path / "parts", load_config(None, settings + ["finetune.max_steps=7"]))
    finetune(manifest, tmp_path / "m.parquet", tmp_path / "parts", load_config(None, settings))
    about = json.loads((tmp_path / "whole" / "finetune.json").read_text())
    assert about["precision"] == "bf16" and about["device"] == "cuda"
    a = torch.load(tmp_path / "whole" / "best.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "best.pt", weights_only=True)
    start, _ = build_network("mobilenet_v2", "none")
    moved = {k: (a[k].float() - v.float()).norm() for k, v in start.state_dict().items()
             if k in a and v.dtype.is_floating_point and "head" not in k and "classifier" not in k}
    # cuDNN's convolutions need not be deterministic: the resumed weights stay far nearer the uninterrupted run's
    # than either is to where training started
    apart = sum((a[k].float() - b[k].float()).norm() for k in moved)
    assert apart < 0.1 * sum(moved.values())


def test_cuml_tsne_is_at_least_10x_the_cpu_path_on_the_same_rows():
    """The issue's goal for `embed`: t-SNE of 10,000 rows on cuML at >= 10x scikit-learn's, same rows, same run."""
    import time

    from aml_rapids.explain.embedding import embed_space

    needs_cuml()
    X, _ = separable(rows=10_000, dim=256)
    settings = load_config().explain.embed
    seconds = {}
    for backend in ("sklearn", "cuml"):
        started = time.perf_counter()
        _, coords = embed_space(X, settings, backend)
        seconds[backend] = time.perf_counter() - started
        assert coords.shape == (10_000, 2) and np.isfinite(coords).all()
    print(f"t-SNE of 10,000 rows: sklearn {seconds['sklearn']:.1f} s, cuml {seconds['cuml']:.1f} s")
    assert seconds["sklearn"] >= 10 * seconds["cuml"], seconds


@needs_gpu
def test_grad_cam_on_the_gpu_gives_the_cpu_maps():
    """A planted network (logit 1: the mean of a positive convolution), so every map has evidence to compare."""
    from torch import nn

    from aml_rapids.explain.gradcam import gradcam_maps
    from aml_rapids.explain.networks import ExplainedNetwork

    torch.manual_seed(0)
    conv, head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)
    with torch.no_grad():
        conv.weight.abs_(), head.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
    net = ExplainedNetwork("tiny", model, model[0], ["dark", "bright"], "fine-tuned head", "", {},
                           lambda t: np.zeros(len(t), bool))
    images = torch.rand(8, 3, 64, 64)
    targets = np.ones(8, dtype=int)
    on_gpu = gradcam_maps(net, images, targets, batch_size=8, device="cuda")
    on_cpu = gradcam_maps(net, images, targets, batch_size=8, device="cpu")
    assert (on_cpu.max(axis=(1, 2)) > 0).all() and np.abs(on_gpu - on_cpu).max() < 1e-3


def _demo_manifest(root):
    write_demo_dataset(root, 1, 20)
    return build_manifest(root, IndexConfig(verify_decode=False)).manifest


@needs_gpu
@pytest.mark.parametrize("engine, precision", [("tensorrt", "fp16"), ("tensorrt", "bf16"), ("auto", "auto")])
def test_gpu_engines_pass_the_parity_guard_against_pytorch_fp32(tmp_path, engine, precision):
    """TensorRT (through torch-tensorrt, skipped where it is not installed) and auto's choice on the GPU give
    features within the guard's cosine of PyTorch fp32, on real-looking cells."""
    if engine == "tensorrt":
        pytest.importorskip("torch_tensorrt")
    from aml_rapids.features.engines import calibration_cells
    from aml_rapids.features.extract import load_backbones

    manifest = _demo_manifest(tmp_path / "cells")
    cfg = load_config(None, ["features.backbones=[{name: mobilenet_v2, weights: none}]", "loader.batch_size=64",
                             "loader.device=gpu", f"features.engine={engine}", f"features.precision={precision}"])
    loaded = load_backbones(cfg, "cuda", lambda norms: calibration_cells(manifest, cfg, norms))
    check = loaded.checks["mobilenet_v2"]
    assert check["min_cosine"] >= check["threshold"] >= 0.999
    if engine == "tensorrt":
        assert loaded.info["mobilenet_v2"]["engine"] == "tensorrt"
    extract(manifest, tmp_path / "s.zarr", cfg, backbones=loaded)
    assert FeatureStore.open(tmp_path / "s.zarr").summary()["ok"] == len(manifest.table)


@needs_gpu
def test_attention_mil_trains_on_the_gpu_and_its_model_predicts_alike_on_a_cpu(tmp_path):
    import pandas as pd

    from aml_rapids.patients.bags import Bags
    from aml_rapids.patients.model import PatientMILClassifier

    rng = np.random.default_rng(0)
    signal = rng.normal(0, 1, 32)
    X, labels = [], []
    for p in range(40):  # four cells of each "pos" patient moved along one direction: only they tell
        x = rng.normal(0, 1, (50, 32)) + rng.normal(0, 0.3, 32)
        if p % 2:
            x[:4] += 6 * signal / np.linalg.norm(signal)
        X.append(x)
        labels.append("pos" if p % 2 else "neg")
    keys = np.array([f"c/p{p:02d}" for p in range(40)])
    rows = pd.DataFrame({"key": np.repeat(keys, 50), "label": np.repeat(labels, 50)})
    bags = Bags(rows, np.concatenate(X).astype(np.float32), keys, np.array(labels), np.arange(0, 2001, 50))
    train, held = bags.subset(np.arange(30)), bags.subset(np.arange(30, 40))
    model = PatientMILClassifier(block_dims=(32,), pca_components=32, ensemble=2, device="cuda").fit(train)
    proba, _ = model.outputs(held)
    joblib.dump(model, tmp_path / "mil.joblib")
    with pytest.MonkeyPatch.context() as patch:  # a machine without a GPU
        patch.setattr(torch.cuda, "is_available", lambda: False)
        on_cpu = joblib.load(tmp_path / "mil.joblib").predict_proba(held)
    assert np.allclose(on_cpu, proba, atol=1e-4)
    assert (model.predict(held) == held.labels).mean() >= 0.9
