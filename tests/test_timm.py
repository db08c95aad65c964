"""timm backbones: a timm ViT and a timm CNN (timm's own tiny test models, random weights) as registry entries
like the torchvision ones: extracted into the store as timm computes them, loaded from a state_dict file,
fine-tuned and explained; weights for offline nodes (fetch, register, list); and the bad input around them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from aml_rapids import workflow
from aml_rapids.cli import app
from aml_rapids.config import load_config
from aml_rapids.errors import AmlRapidsError, ConfigError, WeightsError
from aml_rapids.explain.gradcam import gradcam_maps
from aml_rapids.explain.networks import from_checkpoint
from aml_rapids.features.backbones import get_spec
from aml_rapids.features.store import FeatureStore
from aml_rapids.data.manifest import read_manifest
from aml_rapids.features.extract import load_backbones
from aml_rapids.features.published import url_file
from aml_rapids.features.weights import load_backbone, load_state
from aml_rapids.loader.loader import CellLoader
from aml_rapids.outputs import file_sha256

runner = CliRunner()
MODELS = ("test_vit", "test_convnext")  # a ViT (class token, 16-pixel patches) and a CNN, each about 1 MB
SETTINGS = ["features.backbones=[{name: timm:test_vit, weights: none}, {name: timm:test_convnext, weights: none}]",
            "loader.image_size=64", "loader.device=cpu", "loader.batch_size=16", "features.chunk_batches=2",
            "features.store_dtype=float32", "features.engine=torch", "features.precision=fp32",
            "augment.enabled=false", "oversample.enabled=false"]


def timm_features(name: str, images: torch.Tensor, seed: int = 0) -> np.ndarray:
    """timm's own pre-logits features of a model initialised as aml-rapids initialises it (seeded)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True).numpy()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Synthetic cells (5 classes x 2 patients x 4), indexed, split by image, extracted by both timm models."""
    root = tmp_path_factory.mktemp("timm")
    cfg = load_config(None, SETTINGS + ["split.method=image"])
    manifest = workflow.index(workflow.demo_data(root / "demo", patients=2, cells=4, seed=0), root, cfg).manifest
    workflow.split(manifest, cfg)
    workflow.extract(manifest, root / "features.zarr", cfg)
    return root


def test_stored_features_are_timms_own_pre_logits_on_the_same_preprocessed_cells(run):
    cfg = load_config(None, SETTINGS)
    store = FeatureStore.open(run / "features.zarr")
    rows = store.rows()
    manifest = read_manifest(run / "manifest.parquet")
    for name in MODELS:
        spec = get_spec(f"timm:{name}")
        assert store.meta["backbones"][spec.name]["dim"] == spec.dim == timm.create_model(name).num_features
        batches = list(CellLoader(manifest.table, manifest.root, cfg, normalizations={"n": spec.normalization}))
        images = torch.cat([b.images["n"] for b in batches])
        cells = manifest.table["cell_id"].to_numpy()[np.concatenate([b.positions for b in batches])]
        order = rows.reset_index().set_index("cell_id").loc[cells, "index"].to_numpy()
        stored = store.features(spec.name)[:][order]
        np.testing.assert_allclose(stored, timm_features(name, images), rtol=1e-4, atol=1e-5)
    assert (rows["status"] == 1).sum() == len(manifest.table)


def test_a_state_dict_saved_from_timm_loads_as_weights_and_gives_timms_features(tmp_path):
    torch.manual_seed(7)
    model = timm.create_model("test_vit", pretrained=False).eval()
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    net, info = load_backbone("timm:test_vit", str(tmp_path / "vit.pth"))
    images = torch.rand(3, 3, 48, 48)
    with torch.no_grad():
        np.testing.assert_allclose(net(images).numpy(), timm_features("test_vit", images, seed=7), atol=1e-5)
    assert info.pretrained and info.source == str(tmp_path / "vit.pth") and len(info.sha256) == 64


def test_weights_for_another_network_are_refused_naming_the_first_tensor_that_differs(tmp_path):
    torch.save(timm.create_model("test_convnext").state_dict(), tmp_path / "cnn.pth")
    with pytest.raises(WeightsError, match=r"do not fit timm:test_vit: .*missing keys \(blocks\.0\."):
        load_backbone("timm:test_vit", str(tmp_path / "cnn.pth"))
    state = timm.create_model("test_vit").state_dict()
    state["pos_embed"] = torch.zeros(1, 5, 64)
    torch.save(state, tmp_path / "wide.pth")  # the same architecture, one tensor of another shape
    with pytest.raises(WeightsError, match=r"1 shape mismatches \(first: pos_embed: file \(1, 5, 64\)"):
        load_backbone("timm:test_vit", str(tmp_path / "wide.pth"))


def test_a_dino_training_checkpoint_loads_through_timms_converter(tmp_path):
    """DinoBloom's release is a DINOv2 training checkpoint: the teacher's backbone under ``backbone.``, beside
    its DINO heads, with DINOv2's mask token; timm's converter maps it onto timm's ViT."""
    torch.manual_seed(3)
    model = timm.create_model("test_vit", pretrained=False).eval()
    teacher = {f"backbone.{k}": v for k, v in model.state_dict().items() if not k.startswith("head.")}
    teacher |= {"backbone.mask_token": torch.zeros(1, 64), "dino_head.mlp.0.weight": torch.zeros(8, 64)}
    torch.save({"teacher": teacher}, tmp_path / "dino.pth")
    spec = get_spec("timm:test_vit")
    whole = spec.build()
    whole.reset_classifier(0)  # DINO releases carry no classification head
    assert not load_state(spec, whole, tmp_path / "dino.pth")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(spec.truncate(whole).eval()(images).numpy(),
                                   timm_features("test_vit", images, seed=3), atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_a_timm_model_fine_tunes_a_step_and_gives_a_grad_cam_map(run, tmp_path, name):
    cfg = load_config(None, SETTINGS + [f"finetune.backbone=timm:{name}", "finetune.weights=none",
                                        "finetune.max_steps=1", "finetune.batch_size=8", "finetune.precision=fp32",
                                        "evaluate.bootstrap_samples=10"])
    result = workflow.finetune(run / "manifest.parquet", tmp_path / "ft", cfg)
    assert result.steps == 1 and result.weights.is_file()
    net = from_checkpoint(result.folder)
    assert net.kind == "fine-tuned head" and len(net.classes) == 5
    images = torch.rand(2, 3, 64, 64)
    maps = gradcam_maps(net, images, np.array([0, 1]), batch_size=2, device="cpu")  # the ViT: its 4x4 token grid
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and maps.max() > 0


def test_fetch_without_internet_fails_clearly_and_a_local_file_is_registered_and_checksummed(tmp_path, monkeypatch):
    for variable, folder in (("TORCH_HOME", "torch"), ("HF_HUB_CACHE", "hf"), ("AML_RAPIDS_CACHE", "own")):
        monkeypatch.setenv(variable, str(tmp_path / folder))  # registered files go to aml-rapids' own cache
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what this machine is; no retries
    for name in ("mobilenet_v2", "timm:test_vit", "timm:hf-hub:someone/cells"):
        result = runner.invoke(app, ["weights", "fetch", name, "--to", str(tmp_path / "out")])
        assert result.exit_code == 12, result.output
        assert f"could not download" in result.output and f"weights fetch {name} --file FILE" in result.output
    torch.manual_seed(1)
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "vit.pth")
    result = runner.invoke(app, ["weights", "fetch", "timm:test_vit", "--file", str(tmp_path / "vit.pth"), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["result"]
    assert row["place"] == "registered" and row["sha256"] == file_sha256(tmp_path / "vit.pth")
    listed = json.loads(runner.invoke(app, ["weights", "list", "--json"]).stdout)["result"]
    assert [(r["backbone"], r["sha256"]) for r in listed] == [("timm:test_vit", row["sha256"])]
    net, info = load_backbone("timm:test_vit", "pretrained")  # the registered file is now its published weights
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(net(images).numpy(), timm_features("test_vit", images, seed=1), atol=1e-5)
    assert info.source == "pretrained" and info.sha256 == row["sha256"]
    shown = {r["name"]: r for r in json.loads(runner.invoke(app, ["backbones", "--json"]).stdout)["result"]}
    assert shown["timm:test_vit"]["weights"]["place"] == "registered" and "dinobloom_s" in shown
    assert shown["dinobloom_s"]["input_size"] == "224x224" and "Koch" in shown["dinobloom_s"]["citation"]
    Path(row["path"]).write_bytes(b"damaged")
    with pytest.raises(WeightsError, match="registered for timm:test_vit at .* are damaged"):
        load_backbone("timm:test_vit", "pretrained")
    torch.save(timm.create_model("test_convnext").state_dict(), tmp_path / "cnn.pth")
    result = runner.invoke(app, ["weights", "fetch", "timm:test_vit", "--file", str(tmp_path / "cnn.pth")])
    assert result.exit_code == 3 and "do not fit timm:test_vit" in result.output


def test_published_weights_missing_offline_name_every_place_looked_at(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match=r"not on this machine \(looked at: .*timm-test_vit-[0-9a-f]{8}/registered.json; "
                                           rf"{tmp_path / 'hf'} \(hub repository timm/test_vit.r160_in1k"):
        load_backbone("timm:test_vit", "pretrained")


def hub_repo(cache: Path, repo: str, config: dict) -> None:
    """A hub repository's config.json in a Hugging Face cache, laid out as huggingface_hub lays it out."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("0" * 40) / "config.json").write_text(json.dumps(config))


def test_a_hub_model_builds_from_its_cached_config_and_bad_ones_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    pretrained = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "classifier": "head", "input_size": [3, 64, 64]}
    hub_repo(tmp_path / "hf", "lab/cells-vit", {"architecture": "test_vit", "num_classes": 0,
                                                "model_args": {"dynamic_img_size": False, "img_size": 64},
                                                "pretrained_cfg": pretrained})
    spec = get_spec("timm:hf-hub:lab/cells-vit")
    assert (spec.dim, spec.input_size, spec.normalization.mean, spec.published.hf_repo) == (
        64, 64, (0.1, 0.2, 0.3), "lab/cells-vit")
    assert load_backbone(spec.name, "none")[0](torch.rand(1, 3, 64, 64)).shape == (1, 64)
    with pytest.raises(ConfigError, match="timm:hf-hub:lab/cells-vit takes 64x64 images only"):
        load_backbones(load_config(None, [f"features.backbones=[{{name: {spec.name}, weights: none}}]",
                                                   "loader.image_size=32"]), "cpu")
    hub_repo(tmp_path / "hf", "lab/plain", {"hidden_size": 384})
    with pytest.raises(WeightsError, match="not a timm model config .*'architecture' and 'pretrained_cfg'"):
        get_spec("timm:hf-hub:lab/plain")
    hub_repo(tmp_path / "hf", "lab/tall", {"architecture": "test_vit", "pretrained_cfg": pretrained,
                                           "model_args": {"dynamic_img_size": False, "img_size": [64, 48]}})
    with pytest.raises(ConfigError, match="takes 64x48 images only, and the loader resizes every cell to a square"):
        get_spec("timm:hf-hub:lab/tall")
    with pytest.raises(WeightsError, match="config.json is not in the Hugging Face cache"):
        get_spec("timm:hf-hub:lab/absent")


def test_unknown_timm_names_suggest_close_ones():
    with pytest.raises(ConfigError, match="timm has no model 'convnxt_tiny'.*close names: convnext_tiny"):
        get_spec("timm:convnxt_tiny")
    with pytest.raises(ConfigError, match="no pretrained tag 'in99k'.*fb_in1k"):
        get_spec("timm:convnext_tiny.in99k")
    with pytest.raises(AmlRapidsError, match="unknown backbone 'dinobloom_x'.*timm:NAME.*dinobloom_s"):
        get_spec("dinobloom_x")


def test_the_dinobloom_presets_build_offline_with_their_published_input():
    spec = get_spec("dinobloom_s")
    assert (spec.dim, spec.input_size, spec.tokens, spec.cam_layer) == (384, 224, 1, "blocks.11.norm1")
    assert url_file(spec.published.url) == "DinoBloom-S.pth" and "zenodo.org/records/10908163" in spec.published.url
    assert spec.normalization.mean == (0.485, 0.456, 0.406)
    assert (get_spec("dinobloom_b").dim, get_spec("dinobloom_l").dim) == (768, 1024)


def test_a_vit_that_resizes_its_position_embedding_per_batch_is_refused_by_export_with_the_operator(tmp_path):
    """ONNX has no antialiased bicubic resize: a dynamic-size timm ViT cannot be exported (engines then leave
    OpenVINO and ONNX Runtime out); the refusal is one line, exit 11, and nothing is written."""
    result = runner.invoke(app, ["export", "timm:test_vit", "--weights", "none", "-o", str(tmp_path / "out"),
                                 "--format", "onnx"])
    assert result.exit_code == 11, result.output
    assert "timm:test_vit cannot be written as ONNX (opset 18)" in result.output
    assert "upsample_bicubic2d_aa" in result.output and not (tmp_path / "out").exists()


def test_malformed_hub_configs_and_repository_ids_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    good = {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [3, 64, 64]}
    for repo, config, words in [
            ("lab/listed", [1, 2], "not a timm model config"),
            ("lab/nameless", {"architecture": "no_such_net", "pretrained_cfg": good}, "does not build a timm model"),
            ("lab/colour", {"architecture": "test_vit", "pretrained_cfg": {**good, "mean": "x"}}, "not three numbers"),
            ("lab/kwargs", {"architecture": "test_vit", "pretrained_cfg": good, "model_args": {"bogus": 3}},
             "does not build a timm model .TypeError"),
            ("lab/argslist", {"architecture": "test_vit", "pretrained_cfg": good, "model_args": [1]}, "not a mapping")]:
        hub_repo(tmp_path / "hf", repo, config)
        with pytest.raises(WeightsError, match=words):
            get_spec(f"timm:hf-hub:{repo}")
    for name in ("timm:hf-hub:", "timm:hf-hub:a/b/c", "timm:hf-hub:../../etc"):
        with pytest.raises(ConfigError, match="is not a hub repository id"):
            get_spec(name)
    hub_repo(tmp_path / "hf", "lab/headless", {"architecture": "test_vit", "num_classes": 0, "pretrained_cfg": good})
    assert get_spec("timm:hf-hub:lab/headless").head == "head"  # the architecture's own, for fine-tuning


def test_names_that_flatten_alike_keep_apart_and_a_headless_encoder_file_loads(tmp_path):
    from aml_rapids.outputs import slug
    assert slug("timm:hf-hub:org/vit") != slug("timm:hf-hub:org-vit") and slug("mobilenet_v2") == "mobilenet_v2"
    with pytest.raises(ConfigError, match="names timm:test_vit more than once"):
        load_config(None, ["features.backbones=[{name: timm:test_vit}, {name: timm:test_vit, weights: none}]"])
    with pytest.raises(ConfigError, match="not YAML .*quote a value"):
        load_config(None, ["features.backbones=[{name: x"])
    torch.manual_seed(2)
    headless = timm.create_model("test_vit", num_classes=0)
    torch.save(headless.state_dict(), tmp_path / "encoder.pth")
    net, _ = load_backbone("timm:test_vit", str(tmp_path / "encoder.pth"))
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(net(images).numpy(), headless.forward_head(
            headless.forward_features(images), pre_logits=True).numpy(), atol=1e-5)
    for args, words in [(["weights", "fetch", ","], "name at least one backbone"),
                        (["weights", "fetch", "timm:test_vit", "--file", str(tmp_path / "encoder.pth"), "--to",
                          str(tmp_path)], "give one")]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and words in result.output, result.output


def test_fine_tuning_a_fixed_size_network_at_another_size_is_refused_before_any_folder(run, tmp_path):
    cfg = load_config(None, SETTINGS + ["finetune.backbone=dinobloom_s", "finetune.weights=none"])
    with pytest.raises(ConfigError, match="dinobloom_s takes 224x224 images only; set loader.image_size=224"):
        workflow.finetune(run / "manifest.parquet", tmp_path / "ft", cfg)
    assert not (tmp_path / "ft").exists()
