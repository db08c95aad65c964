"""Fine-tuning: the registry's uniform surface, the training loader's epochs, the loop on the tiny network,
kills and resumes (SIGKILL in a separate process), checkpoints of other runs, and the fine-tuned weights'
provenance down to evaluation, which refuses the cells they were trained on."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from aml_rapids.cli import app
from aml_rapids.config import IndexConfig, load_config
from aml_rapids.data.manifest import build_manifest, read_manifest, write_manifest
from aml_rapids.data.splits import make_split
from aml_rapids.data.synthetic import write_demo_dataset
from aml_rapids.errors import ConfigError, DataError, OutputError, TrainingDiverged
from aml_rapids.explain.gradcam import gradcam_maps
from aml_rapids.explain.networks import ExplainedNetwork, gradcam_layer
from aml_rapids.features.backbones import REGISTRY, get_spec
from aml_rapids.features.weights import WeightsError, build_network, load_backbone
from aml_rapids.finetune.schedule import FreezeSchedule
from aml_rapids.finetune.data import epoch_table, stratified_sample
from aml_rapids.finetune.train import finetune
from aml_rapids.loader.augment import affine_matrices
from aml_rapids.loader.loader import CellLoader

SETTINGS = {"finetune.backbone": "tiny", "finetune.weights": "none", "finetune.lr": 0.003, "finetune.batch_size": 8,
            "finetune.val_every": 4, "finetune.epochs": 2, "loader.image_size": 32, "loader.device": "cpu",
            "loader.num_threads": 1, "evaluate.bootstrap_samples": 10,
            "finetune.precision": "fp32"}  # auto would time the tiny network; its choice could differ between runs
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["aml_rapids.cli", "aml_rapids.finetune.train", "typer.testing", __name__])


def settings(**extra) -> list[str]:
    return [f"{k}={v}" for k, v in {**SETTINGS, **extra}.items()]


def config(**extra):
    return load_config(None, settings(**extra))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """5 synthetic classes x 4 patients x 6 cells, split by patient (train 2, val 1, test 1 a class)."""
    root = tmp_path_factory.mktemp("finetune")
    write_demo_dataset(root / "data", 4, 6, seed=3)
    built = build_manifest(root / "data", IndexConfig(verify_decode=False)).manifest
    built.table = make_split(built.table, load_config().split).table
    built.meta["split"] = {"method": "patient", "seed": 0}
    write_manifest(built, root / "manifest.parquet")
    return root / "manifest.parquet"


def run(manifest: Path, out: Path, **extra):
    return finetune(read_manifest(manifest), manifest, out, config(**extra))


def network_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# -- the registry's uniform surface -------------------------------------------------------------------------

@pytest.mark.parametrize("name", [*sorted(REGISTRY), "timm:test_vit", "timm:test_convnext"])
def test_every_registry_network_has_a_head_to_reset_a_last_block_and_a_grad_cam_layer(name):
    spec = get_spec(name)
    model, _ = build_network(name, "none")
    assert isinstance(model.get_submodule(spec.head), nn.Linear)
    assert isinstance(model.get_submodule(spec.last_block), nn.Module)
    spec.reset_head(model, 3)
    assert spec.classes_of(model.state_dict()) == 3
    size = spec.input_size or 64
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert model.eval()(images).shape == (2, 3)
    explained = ExplainedNetwork(name, model, gradcam_layer(model, spec), ["a", "b", "c"], "fine-tuned head", "",
                                 {}, lambda table: np.zeros(len(table), bool))
    maps = gradcam_maps(explained, images, np.array([1, 2]), batch_size=2, device="cpu")  # a ViT: its token grid
    assert maps.shape == (2, size, size) and np.isfinite(maps).all() and 0 <= maps.min() <= maps.max() <= 1 + 1e-6
    assert maps.max() > 0  # evidence somewhere: the layer gets gradients (a random network's map may be blank)
    head_only = FreezeSchedule(spec, freeze_epochs=1, unfreeze="last_block")
    head_only.apply(model, 0)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{spec.head}.weight", f"{spec.head}.bias"}
    head_only.apply(model, 1)
    after = [n for n, p in model.named_parameters() if p.requires_grad]
    assert after[0].startswith(spec.last_block + ".") and after[-1] == f"{spec.head}.bias"
    assert 2 < len(after) < len(list(model.parameters()))
    FreezeSchedule(spec, 0, "all").apply(model, 0)
    assert all(p.requires_grad for p in model.parameters())


def test_a_fine_tuned_state_dict_loads_as_weights_with_its_own_head_size(tmp_path):
    model, _ = build_network("tiny", "none", seed=4)
    REGISTRY["tiny"].reset_head(model, 5)
    torch.save(model.state_dict(), tmp_path / "best.pt")
    whole, info = build_network("tiny", str(tmp_path / "best.pt"))
    assert whole.head.out_features == 5  # no finetune.json beside it: said so, not taken for ImageNet's
    assert info.finetuned.words() == "fine-tuned on unknown cells (no finetune.json beside the weights)"
    features, _ = load_backbone("tiny", str(tmp_path / "best.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(features(x), REGISTRY["tiny"].truncate(model).eval()(x))


def test_a_backbone_without_a_head_cannot_be_fine_tuned(manifest, tmp_path):
    REGISTRY["headless"] = dataclasses.replace(REGISTRY["tiny"], name="headless", head=None)
    try:
        with pytest.raises(ConfigError, match="backbone 'headless' has no classification head to replace"):
            run(manifest, tmp_path / "ft", **{"finetune.backbone": "headless"})
    finally:
        del REGISTRY["headless"]


def test_frozen_batch_norm_layers_keep_their_statistics_and_predict_restores_every_mode():
    from aml_rapids.finetune.loop import predict
    from aml_rapids.finetune.task import Task

    spec = REGISTRY["mobilenet_v2"]
    model, info = build_network("mobilenet_v2", "none")
    spec.reset_head(model, 3)
    FreezeSchedule(spec, freeze_epochs=1, unfreeze="all").apply(model, 0)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.training and model.get_submodule(spec.head).training and not any(m.training for m in norms)
    before = [m.running_mean.clone() for m in norms]
    task = Task(model, spec, info, ["a", "b", "c"], "cpu", "fp32", False)
    loss = task.forward(torch.randn(2, 3, 64, 64)).sum()
    loss.backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))
    batch = type("Batch", (), {"images": {"x": torch.randn(2, 3, 64, 64)}, "positions": np.arange(2)})
    predict(task, [batch])
    assert model.training and not any(m.training for m in norms)
    FreezeSchedule(spec, freeze_epochs=1, unfreeze="all").apply(model, 1)
    assert all(m.training for m in norms)


def test_auto_precision_is_bf16_only_where_measured_faster(manifest, monkeypatch):
    from aml_rapids.finetune import task as task_module

    made = task_module.make_task(config().finetune, ["a", "b"], "cpu", False)
    for measured, chosen in (({"fp32": 10.0, "bf16": 19.0}, "bf16"), ({"fp32": 10.0, "bf16": 10.5}, "fp32")):
        monkeypatch.setattr(task_module, "probe_precisions", lambda *a, m=measured, **k: m)
        task_module.choose_precision(made, config(**{"finetune.precision": "auto"}).finetune, 32)
        assert made.precision == chosen and made.measured == measured
    monkeypatch.undo()
    measured = task_module.probe_precisions(made.model, 32, 4, False, repeats=1)
    assert set(measured) == {"fp32", "bf16"} and min(measured.values()) > 0
    assert all(p.grad is None for p in made.model.parameters())  # the probe trains a copy, never the network


# -- the training loader's epochs ---------------------------------------------------------------------------

def test_every_epoch_reshuffles_every_row_once_and_draws_new_augmentations(manifest):
    table = read_manifest(manifest).table.assign(aug_index=0)
    train = table[table["split"] == "train"].reset_index(drop=True)
    orders = [epoch_table(train, 0, e)["cell_id"].tolist() for e in range(3)]
    assert all(sorted(o) == sorted(train["cell_id"]) for o in orders) and orders[0] != orders[1]
    assert orders[1] == epoch_table(train, 0, 1)["cell_id"].tolist()
    aug = load_config().augment
    draws = [affine_matrices(train, aug, 0, 32, epoch) for epoch in (None, 0, 1)]
    assert not np.allclose(draws[0], draws[1]) and not np.allclose(draws[1], draws[2])
    assert np.array_equal(draws[1], affine_matrices(train, aug, 0, 32, 0))
    loader = CellLoader(epoch_table(train, 0, 1), manifest.parent / "data", config(**{"loader.batch_size": 7}),
                        augment=True, epoch=1)
    positions = np.concatenate([b.positions for b in loader])
    assert sorted(positions) == list(range(len(train)))


def test_a_validation_sample_keeps_the_class_proportions():
    table = pd.DataFrame({"label": ["a"] * 60 + ["b"] * 30 + ["c"] * 10, "cell_id": range(100)})
    sample = stratified_sample(table, 20, seed=1)
    assert sample["label"].value_counts().to_dict() == {"a": 12, "b": 6, "c": 2}
    assert sample.equals(stratified_sample(table, 20, seed=1)) and len(stratified_sample(table, None, 0)) == 100


# -- the loop -----------------------------------------------------------------------------------------------

def test_fine_tuning_the_tiny_network_lowers_the_loss_and_writes_everything(manifest, tmp_path):
    out = tmp_path / "ft"
    summary = run(manifest, out, **{"finetune.epochs": 4})
    steps = pd.read_csv(out / "steps.csv")
    assert summary.steps == len(steps) == 4 * 8 and summary.status == "finished 4 epochs"  # 60 rows, batches of 8
    first, last = steps["train_loss"].head(6).mean(), steps["train_loss"].tail(6).mean()
    assert last < first - 0.05, (first, last)
    val = steps.dropna(subset=["val_loss"])
    assert list(val["step"]) == [4, 8, 12, 16, 20, 24, 28, 32]
    about = json.loads((out / "finetune.json").read_text())
    assert about["best"]["step"] == int(val.loc[val["val_loss"].idxmin(), "step"])
    assert about["weights"]["sha256"] and about["seen_cells"]["cells"] == 60 + 30
    assert about["manifest"]["digest"] == read_manifest(manifest).digest() and about["split"]["method"] == "patient"
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "curves.svg").is_file()
    head = json.loads((out / "eval-test" / "metrics.json").read_text())
    assert head["backend"] == "torch: the fine-tuned network's own head" and head["cell_level"]["n"] == 30
    assert "fine-tuned on" in head["backbones"]["tiny"]["finetuned"]["words"]
    best = network_state(out / "best.pt")
    assert REGISTRY["tiny"].classes_of(best) == 5


def test_an_early_stop_keeps_the_best_step(manifest, tmp_path):
    summary = run(manifest, tmp_path / "ft", **{"finetune.lr": 0.5, "finetune.patience": 1, "finetune.epochs": 20,
                                                "finetune.val_every": 1})
    assert summary.status.startswith("early stopping: 1 validations without a lower loss than step")
    assert summary.steps == summary.best["step"] + 1 and summary.epochs_run < 20


# -- kills and resumes --------------------------------------------------------------------------------------

def _killed_at(step: int, manifest: str, out: str, extra: list[str]) -> None:
    """``aml-rapids finetune`` in its own process, SIGKILLed in the middle of optimizer step ``step``."""
    real, count = torch.optim.Adam.step, [0]

    def step_then_maybe_die(self, *args, **kwargs):
        count[0] += 1
        if count[0] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args, **kwargs)

    torch.optim.Adam.step = step_then_maybe_die
    CliRunner().invoke(app, ["finetune", manifest, "-o", out, *sum((["--set", s] for s in extra), [])])


@pytest.mark.parametrize("kill_at, extra", [(11, {}), (6, {"finetune.checkpoint_every": 3})],
                         ids=["mid-epoch-2, resumed from epoch 1's end", "mid-epoch-1, resumed from step 3"])
def test_killed_and_resumed_it_ends_with_the_uninterrupted_weights(manifest, tmp_path, kill_at, extra):
    whole = tmp_path / "whole"
    run(manifest, whole, **extra)
    out = tmp_path / "killed"
    proc = CTX.Process(target=_killed_at, args=(kill_at, str(manifest), str(out), settings(**extra)))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    resumed_from = torch.load(out / "checkpoint.pt", weights_only=True)["position"]["step"]
    assert resumed_from == (8 if not extra else 3)
    result = CliRunner().invoke(app, ["finetune", str(manifest), "-o", str(out), *sum((["--set", s] for s in
                                                                                        settings(**extra)), [])])
    assert result.exit_code == 0, result.output
    assert f"resuming {out / 'checkpoint.pt'}" in result.output
    assert_same_weights(network_state(out / "best.pt"), network_state(whole / "best.pt"))
    assert_same_weights(network_state(out / "checkpoint.pt"), network_state(whole / "checkpoint.pt"))
    steps = ["step", "train_loss", "val_loss"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "steps.csv")[steps], pd.read_csv(whole / "steps.csv")[steps])


def test_stopped_at_max_steps_between_validations_then_run_on_it_ends_as_an_uninterrupted_run(manifest, tmp_path):
    whole = run(manifest, tmp_path / "whole")
    part = run(manifest, tmp_path / "parts", **{"finetune.max_steps": 6})
    assert part.steps == 6 and part.best["step"] == 4  # no extra validation at step 6: the run is as it was
    rest = run(manifest, tmp_path / "parts")
    assert rest.steps == whole.steps and rest.best == whole.best
    assert_same_weights(network_state(tmp_path / "parts" / "best.pt"), network_state(tmp_path / "whole" / "best.pt"))


def test_a_checkpoint_of_another_run_is_refused(manifest, tmp_path):
    out = tmp_path / "ft"
    run(manifest, out, **{"finetune.max_steps": 2})
    with pytest.raises(ConfigError, match=r"checkpoint of another fine-tuning \(it differs in policy.lr\)"):
        run(manifest, out, **{"finetune.lr": 0.01})
    other = read_manifest(manifest)
    other.table = other.table[other.table["label"] != other.table["label"].iloc[0]]
    write_manifest(other, tmp_path / "four.parquet")
    with pytest.raises(ConfigError, match=r"differs in classes, manifest"):
        finetune(read_manifest(tmp_path / "four.parquet"), tmp_path / "four.parquet", out, config())
    assert run(manifest, out, **{"finetune.max_steps": 3}).steps == 3  # the same run, allowed to go on
    REGISTRY["tiny_copy"] = dataclasses.replace(REGISTRY["tiny"], name="tiny_copy")
    try:
        with pytest.raises(ConfigError, match=r"differs in backbone"):
            run(manifest, out, **{"finetune.backbone": "tiny_copy"})
    finally:
        del REGISTRY["tiny_copy"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds files a fine-tuning did not write"):
        run(manifest, tmp_path / "mine")


def test_a_full_disk_mid_checkpoint_keeps_the_previous_one(manifest, tmp_path, monkeypatch):
    out = tmp_path / "ft"
    real, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "position" in obj:
            saves.append(obj["position"]["step"])
            if len(saves) == 2:  # as torch reports a full disk
                raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                                   "writing file data/0: file write failed")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OutputError, match="cannot write .*checkpoint.pt: torch.save failed: .* PytorchStreamWriter "
                                          "failed writing file data/0: file write failed"):
        run(manifest, out)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["position"]["step"] == saves[0] == 8
    assert not list(out.glob(".*.tmp"))


def test_a_nan_loss_stops_with_the_step_named_and_the_last_checkpoint_kept(manifest, tmp_path, monkeypatch):
    from aml_rapids.finetune import loop

    real, calls = loop.Task.forward, [0]

    def forward(self, images):
        calls[0] += self.model.training
        logits = real(self, images)
        return logits * float("nan") if calls[0] == 10 and self.model.training else logits

    monkeypatch.setattr(loop.Task, "forward", forward)
    out = tmp_path / "ft"
    result = CliRunner().invoke(app, ["finetune", str(manifest), "-o", str(out), *sum((["--set", s] for s in
                                                                                        settings()), [])])
    assert result.exit_code == 10, result.output
    kept = f"kept: {out / 'checkpoint.pt'} (step 8), {out / 'best.pt'} (step 8)"
    assert f"the training loss became nan at step 10; {kept}" in " ".join(result.output.split())
    assert torch.load(out / "checkpoint.pt", weights_only=True)["position"]["step"] == 8
    assert json.loads((out / "finetune.json").read_text())["status"].startswith("diverged: the training loss")


# -- bad input ----------------------------------------------------------------------------------------------

def test_manifests_it_cannot_train_on_are_refused(manifest, tmp_path):
    data = read_manifest(manifest)
    cases = {"no split": (data.table.drop(columns="split"), "has no split; run `aml-rapids split` first"),
             "no val": (data.table[data.table["split"] != "val"], "has no val rows"),
             "a class without training rows": (
                 data.table[~((data.table["label"] == "NPM1") & (data.table["split"] == "train"))],
                 "class\\(es\\) NPM1 have no training rows")}
    for name, (table, message) in cases.items():
        data.table = table
        write_manifest(data, tmp_path / "bad.parquet")
        with pytest.raises(DataError, match=message):
            finetune(read_manifest(tmp_path / "bad.parquet"), tmp_path / "bad.parquet", tmp_path / name, config())


def test_base_weights_that_do_not_fit_are_refused(manifest, tmp_path):
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="do not fit tiny"):
        run(manifest, tmp_path / "ft", **{"finetune.weights": str(tmp_path / "w.pt")})


# -- provenance down to evaluation --------------------------------------------------------------------------

def test_features_of_fine_tuned_weights_say_so_and_evaluation_refuses_the_cells_they_saw(manifest, tmp_path):
    out = tmp_path / "ft"
    run(manifest, out, **{"finetune.max_steps": 4})
    store, model = tmp_path / "f.zarr", tmp_path / "model"
    extract = ["--set", f"features.backbones=[{{name: tiny, weights: {out / 'best.pt'}}}]",
               "--set", "loader.image_size=32", "--set", "loader.device=cpu", "--set", "loader.batch_size=16",
               "--set", "features.store_dtype=float32"]
    runner = CliRunner()
    assert runner.invoke(app, ["extract", str(manifest), "-o", str(store), *extract]).exit_code == 0
    from aml_rapids.features.store import FeatureStore

    opened = FeatureStore.open(store)
    tuned = opened.meta["backbones"]["tiny"]["finetuned"]
    assert tuned["manifest"]["digest"] == read_manifest(manifest).digest() and tuned["seen_cells"] == 90
    rows = opened.rows()
    assert rows.loc[rows["split"].isin(["train", "val"]), "finetune_seen"].all()
    assert not rows.loc[rows["split"] == "test", "finetune_seen"].any()
    assert runner.invoke(app, ["train", str(store), "-o", str(model), "--set", "classify.pca_components=4"]
                         ).exit_code == 0
    refused = runner.invoke(app, ["evaluate", str(model), str(store), "--split", "val"])
    assert refused.exit_code == 2
    assert "30 of the 30 rows of split val" in refused.output and "fine-tuned on" in refused.output
    assert str(out / "best.pt") in refused.output
    result = runner.invoke(app, ["evaluate", str(model), str(store), "--set", "evaluate.bootstrap_samples=10"])
    assert result.exit_code == 0, result.output
    assert "backbones tiny (fine-tuned on" in result.output
    report = json.loads((model / "eval-test" / "metrics.json").read_text())
    assert report["backbones"]["tiny"]["finetuned"]["seen_cells"] == 90


def test_a_weights_file_whose_cell_list_was_tampered_with_is_refused(manifest, tmp_path):
    out = tmp_path / "ft"
    run(manifest, out, **{"finetune.max_steps": 2})
    with open(out / "seen_cells.csv", "a") as fh:
        fh.write("0" * 64 + ",train\n")
    with pytest.raises(DataError, match="is not the cell list .*finetune.json records"):
        load_backbone("tiny", str(out / "best.pt"))
    (out / "finetune.json").write_text(json.dumps({"backbone": "tiny"}))
    with pytest.raises(DataError, match="finetune.json is not a fine-tuning record \\(it lacks base_weights, manifest"):
        load_backbone("tiny", str(out / "best.pt"))


def test_a_checkpoint_of_another_version_is_refused_not_a_traceback(manifest, tmp_path):
    out = tmp_path / "ft"
    run(manifest, out, **{"finetune.max_steps": 2})
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["best_model"], state["run"]
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(DataError, match="checkpoint .*checkpoint.pt lacks best_model, run .*--overwrite starts"):
        run(manifest, out)
