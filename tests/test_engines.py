"""Inference engines on the tiny network: OpenVINO and ONNX Runtime give PyTorch's features, the parity guard
refuses an engine that does not, ``auto`` measures once and remembers, caches are rebuilt when damaged, the store
records (and is keyed by) the engine, and ``export`` writes checked ONNX and OpenVINO files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")  # the CPU engines come with the cpu extra (a GPU machine may lack them)
pytest.importorskip("openvino")
from typer.testing import CliRunner

from aml_rapids.cli import app
from aml_rapids.config import IndexConfig, load_config
from aml_rapids.data.manifest import build_manifest
from aml_rapids.data.splits import make_split
from aml_rapids.errors import EngineError
from aml_rapids.features.engines import EngineUnavailable, ParityError, calibration_cells
from aml_rapids.features.engines import openvino_engine, select
from aml_rapids.features.engines.base import Runner
from aml_rapids.features.engines.parity import cosine_rows
from aml_rapids.features.extract import extract, load_backbones
from aml_rapids.features.store import ATTRS_KEY, FeatureStore, StoreMismatch
from aml_rapids.features.weights import load_backbone

TINY = ["features.backbones=[{name: tiny, weights: none}]", "loader.image_size=32", "loader.device=cpu",
        "loader.batch_size=16", "features.chunk_batches=2", "features.store_dtype=float32",
        "features.calibration_cells=24"]
HAS_BF16 = "BF16" in openvino_engine._core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def cfg(*more: str):
    return load_config(None, [*TINY, *more])


@pytest.fixture
def manifest(tiny_tree):
    indexed = build_manifest(tiny_tree, IndexConfig(verify_decode=False)).manifest
    indexed.table = make_split(indexed.table, load_config(None, ["split.method=image"]).split).table
    return indexed


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache of this test's own (the session's shared one would already hold its conversions)."""
    monkeypatch.setenv("AML_RAPIDS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def calibrate(manifest, config):
    return lambda norms: calibration_cells(manifest, config, norms)


@pytest.mark.parametrize("engine, precision", [("openvino", "fp32"), ("onnxruntime", "fp32"), ("torch", "bf16"),
                                               pytest.param("openvino", "bf16", marks=pytest.mark.skipif(
                                                   not HAS_BF16, reason="this CPU has no bf16 for OpenVINO"))])
def test_an_engine_gives_the_pytorch_features_and_the_store_records_it(manifest, tmp_path, engine, precision):
    reference = cfg("features.engine=torch", "features.precision=fp32")
    asked = cfg(f"features.engine={engine}", f"features.precision={precision}")
    extract(manifest, tmp_path / "torch.zarr", reference)
    extract(manifest, tmp_path / "engine.zarr", asked)
    plain, other = (FeatureStore.open(tmp_path / f"{n}.zarr") for n in ("torch", "engine"))
    ok = plain.rows()["status"].to_numpy() == 1
    cosine = cosine_rows(torch.from_numpy(plain.features("tiny")[:][ok]), torch.from_numpy(other.features("tiny")[:][ok]))
    assert float(cosine.min()) >= (0.9999 if precision == "fp32" else 0.999)
    info = other.meta["backbones"]["tiny"]
    assert (info["engine"], info["precision"]) == (engine, precision)
    check = other.meta["manifests"][0]["engines"]["tiny"]  # what the parity guard measured on this machine
    assert check["engine"] == f"{engine} {precision}" and check["min_cosine"] >= check["threshold"]
    assert check["cells"] == 24
    relaxed = load_backbones(cfg(f"features.engine={engine}", f"features.precision={precision}",
                                 f"features.min_cosine={{{precision}: 0.5}}"), "cpu", calibrate(manifest, asked))
    assert relaxed.checks["tiny"]["threshold"] == 0.5  # a threshold set in the config is the one applied


def test_the_parity_guard_refuses_a_broken_engine_and_auto_passes_it_over(manifest, monkeypatch, own_cache):
    real = select.BUILDERS["onnxruntime"].build

    def broken(target, precision):
        runner = real(target, precision)
        return Runner(runner.choice, lambda images: runner(images) * torch.linspace(-1, 1, 16))  # sign-flipped half

    monkeypatch.setattr(select.BUILDERS["onnxruntime"], "build", broken)
    asked = cfg("features.engine=onnxruntime", "features.precision=fp32")
    with pytest.raises(ParityError, match=r"onnxruntime fp32 features of tiny agree with PyTorch fp32 at cosine "
                                          r"-?0\.\d+ on the worst of 24 cells .*fp32 needs 0\.9999"):
        load_backbones(asked, "cpu", calibrate(manifest, asked))
    auto = cfg()  # engine and precision auto
    loaded = load_backbones(auto, "cpu", calibrate(manifest, auto))
    measured = loaded.checks["tiny"]["auto"]
    assert measured["onnxruntime fp32"].startswith("not used: onnxruntime fp32 features of tiny agree")
    assert loaded.info["tiny"]["engine"] != "onnxruntime" and loaded.checks["tiny"]["min_cosine"] >= 0.999


def test_auto_measures_once_then_reuses_its_choice_and_measures_again_when_it_fails(manifest, monkeypatch,
                                                                                  own_cache):
    timed = []
    real = select._images_per_s
    monkeypatch.setattr(select, "_images_per_s", lambda runner, images: timed.append(runner.choice) or real(runner, images))
    auto = cfg()
    first = load_backbones(auto, "cpu", calibrate(manifest, auto))
    assert len(timed) >= 3  # every candidate that ran was timed
    assert len(list((own_cache / "engines" / "choices").iterdir())) == 1
    timed.clear()
    again = load_backbones(auto, "cpu", calibrate(manifest, auto))
    assert timed == [] and again.info["tiny"]["engine"] == first.info["tiny"]["engine"]
    assert again.checks["tiny"]["min_cosine"] >= 0.999  # checked again all the same
    chosen = first.info["tiny"]["engine"]
    monkeypatch.setattr(select.BUILDERS[chosen], "build", lambda target, precision: (_ for _ in ()).throw(
        EngineUnavailable(f"{chosen} is gone")))
    third = load_backbones(auto, "cpu", calibrate(manifest, auto))
    assert timed and third.info["tiny"]["engine"] != chosen


def test_a_damaged_engine_cache_is_rebuilt_not_trusted(manifest, own_cache, caplog):
    asked = cfg("features.engine=openvino", "features.precision=fp32")
    load_backbones(asked, "cpu", calibrate(manifest, asked))
    (folder,) = [p for p in (own_cache / "engines").iterdir() if (p / "model.bin").is_file()]  # the IR
    weights = folder / "model.bin"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))  # the tail of the weights overwritten
    loaded = load_backbones(asked, "cpu", calibrate(manifest, asked))
    assert "is incomplete or damaged" in caplog.text
    assert loaded.checks["tiny"]["min_cosine"] >= 0.9999
    assert json.loads((folder / "artefact.json").read_text())["files"]["model.bin"]  # rebuilt in place


def test_a_missing_engine_or_precision_is_a_clear_error(manifest, monkeypatch):
    openvino_engine._core.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # as if not installed
    asked = cfg("features.engine=openvino", "features.precision=fp32")
    try:
        with pytest.raises(EngineUnavailable, match=r"openvino is not installed; install openvino .*pip install"):
            load_backbones(asked, "cpu", calibrate(manifest, asked))
    finally:
        openvino_engine._core.cache_clear()
    with pytest.raises(EngineUnavailable, match=r"engine torch runs no int8 on the CPU \(it runs bf16, fp32;"):
        load_backbones(cfg("features.engine=torch", "features.precision=int8"), "cpu", calibrate(manifest, cfg()))
    with pytest.raises(EngineUnavailable, match="engine openvino does not run on the GPU here"):
        select.prepare(select.Target("tiny", load_backbone("tiny", "none")[0], "x", 32, "cuda", 16,
                                     torch.zeros(2, 3, 32, 32)), "openvino", "fp32")
    assert issubclass(EngineUnavailable, EngineError) and EngineError.exit_code == 11


def test_a_store_is_keyed_by_its_engine_and_auto_extends_it_on_its_own(manifest, tmp_path):
    store = tmp_path / "s.zarr"
    extract(manifest, store, cfg("features.engine=onnxruntime", "features.precision=fp32"))
    with pytest.raises(StoreMismatch, match=r"differs in backbones\.tiny\.engine"):
        extract(manifest, store, cfg("features.engine=torch", "features.precision=fp32"))
    summary = extract(manifest, store, cfg())  # auto: whatever is fastest here, the store's engine is used
    assert summary.rows_written == 0 and summary.rows_appended == 0  # the store's own engine: nothing to redo
    assert FeatureStore.open(store).meta["backbones"]["tiny"]["engine"] == "onnxruntime"


def test_an_int8_store_extends_with_new_cells_on_the_network_it_was_made_with(manifest, tmp_path):
    asked = cfg("features.engine=openvino", "features.precision=int8", "features.int8_calibration_cells=20")
    first = type(manifest)(manifest.table.iloc[:40].reset_index(drop=True), manifest.root, manifest.meta)
    store = tmp_path / "s.zarr"
    extract(first, store, asked)
    made_of = FeatureStore.open(store).meta["backbones"]["tiny"]["calibration"]
    summary = extract(manifest, store, asked)  # 20 more cells: other calibration cells, the same int8 network
    assert summary.rows_appended > 0 and summary.rows_failed == 0
    assert FeatureStore.open(store).meta["backbones"]["tiny"]["calibration"] == made_of


def test_a_store_from_before_engines_extends_as_pytorch(manifest, tmp_path):
    """Stores made before engines were a choice ran PyTorch in their configured precision (fp32 on a CPU)."""
    store = tmp_path / "s.zarr"
    extract(manifest, store, cfg("features.engine=torch", "features.precision=fp32"))
    opened = FeatureStore.open(store, mode="r+")
    meta = dict(opened.group.attrs[ATTRS_KEY])
    for key in ("engine", "precision"):
        del meta["backbones"]["tiny"][key]
    opened.group.attrs[ATTRS_KEY] = meta
    assert extract(manifest, store, cfg()).rows_written == 0  # accepted, nothing to compute


def test_int8_on_openvino_is_calibrated_on_its_own_cells_and_keyed_by_them(manifest, tmp_path):
    asked = cfg("features.engine=openvino", "features.precision=int8", "features.calibration_cells=16",
                "features.int8_calibration_cells=40")
    try:
        loaded = load_backbones(asked, "cpu", calibrate(manifest, asked))
    except ParityError as exc:  # a random 2-layer network may not quantise within 0.98; then say by how much
        pytest.fail(f"tiny did not quantise: {exc}")
    norms = {"tiny": loaded.normalizations["tiny"]}
    assert loaded.info["tiny"]["precision"] == "int8"
    assert loaded.info["tiny"]["calibration"] == calibration_cells(manifest, asked, norms, 40).digest  # NNCF's cells
    assert loaded.checks["tiny"]["cells"] == 16 and loaded.checks["tiny"]["threshold"] == 0.98  # the guard's


def test_export_writes_checked_onnx_and_openvino_files(tmp_path, manifest):
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", "tiny", "--weights", "none", "-o", str(out), "--cells",
                                      str(manifest.root), "--set", "loader.image_size=32", "--set",
                                      "features.calibration_cells=12"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "export.json").read_text())
    assert set(record["files"]) == {"model.onnx", "model.xml", "model.bin"}
    assert record["input"]["shape"] == ["batch", 3, 32, 32] and record["input"]["range"] == [0.0, 1.0]
    assert record["output"] == {"name": "features", "shape": ["batch", 16], "dtype": "float32"}
    assert all(p["min_cosine"] >= 0.9999 and p["cells"] == 12 for p in record["parity"].values())
    pixels = torch.rand(3, 3, 32, 32)  # the normalisation is inside: RGB in [0, 1] goes in as it is
    net = load_backbone("tiny", "none")[0]
    from aml_rapids.features.backbones import get_spec
    norm = get_spec("tiny").normalization
    with torch.inference_mode():
        want = net((pixels - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"pixels": pixels.numpy()})[0], want.numpy(), rtol=1e-4, atol=1e-5)
    again = CliRunner().invoke(app, ["export", "tiny", "--weights", "none", "-o", str(out)])
    assert again.exit_code == 8 and "--overwrite" in again.output  # an earlier export is not replaced unasked
    wrong = CliRunner().invoke(app, ["export", "tiny", "--weights", "none", "-o", str(tmp_path / "e2"),
                                     "--format", "tflite"])
    assert wrong.exit_code == 2 and "unknown export format tflite" in wrong.output
    before = (out / "model.onnx").read_bytes()
    refused = CliRunner().invoke(app, ["export", "tiny", "--weights", "none", "-o", str(out), "--overwrite",
                                       "--precision", "int8", "--cells", str(manifest.root), "--set",
                                       "loader.image_size=32", "--set", "features.min_cosine={int8: 1.0}"])
    assert refused.exit_code == 11 and "int8 needs 1.0" in refused.output
    assert (out / "model.onnx").read_bytes() == before  # the earlier export stays until a new one has passed
    assert not list(tmp_path.glob(".export*")) and not list(out.glob(".*"))  # no scratch left behind
    int8 = CliRunner().invoke(app, ["export", "tiny", "--weights", "none", "-o", str(tmp_path / "e3"),
                                    "--precision", "int8"])
    assert int8.exit_code == 2 and "int8 is calibrated on cells: give --cells" in int8.output
    assert not (tmp_path / "e3").exists() or not any((tmp_path / "e3").iterdir())
