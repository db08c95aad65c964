"""Explanation (every registry network's Grad-CAM layer is tested with the registry, in test_finetune.py):
Grad-CAM checked on a planted case by the pointing test, the ViT's token grid; linear probes; the model-randomisation check; occlusion of the hybrid from its own
predictions; embeddings with their quality; galleries; and the bad inputs each command refuses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn
from typer.testing import CliRunner

from aml_rapids import workflow
from aml_rapids.cli import app
from aml_rapids.classify.io import load_model
from aml_rapids.classify.train import predict_store
from aml_rapids.config import load_config
from aml_rapids.data.manifest import read_manifest
from aml_rapids.errors import ConfigError, DataError
from aml_rapids.explain import embedding
from aml_rapids.explain.cells import read_cells
from aml_rapids.explain.gallery import class_rows, patient_rows
from aml_rapids.explain.gradcam import gradcam_maps, token_grid
from aml_rapids.explain.maps import pointing, rank_correlation
from aml_rapids.explain.networks import ExplainedNetwork, from_checkpoint, from_probe, gradcam_layer, probe_weights
from aml_rapids.explain.occlusion import occlusion_maps
from aml_rapids.features.backbones import get_spec
from aml_rapids.features.store import FeatureStore
from aml_rapids.features.weights import build_network

runner = CliRunner()
TINY = ["features.backbones=[{name: tiny, weights: none}]", "loader.image_size=32", "loader.device=cpu",
        "loader.batch_size=16", "features.chunk_batches=2", "classify.pca_components=8", "classify.rf_trees=10",
        "classify.folds=2", "evaluate.bootstrap_samples=10", "explain.gradcam.cells_per_class=3",
        "explain.embed.perplexity=5", "explain.embed.pca_components=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Synthetic cells (5 classes x 4 patients x 8), the tiny network's store, a model and its test report."""
    root = tmp_path_factory.mktemp("explain")
    cfg = load_config(None, TINY)
    data = workflow.demo_data(root / "demo", patients=4, cells=8, seed=0)
    manifest = workflow.index(data, root, cfg).manifest
    workflow.split(manifest, cfg)
    workflow.extract(manifest, root / "features.zarr", cfg)
    workflow.train(root / "features.zarr", root / "model", cfg)
    workflow.evaluate(root / "model", root / "features.zarr", "test", None, cfg)
    return root


def cli(*args: str):
    result = runner.invoke(app, [*map(str, args), *[f"--set={s}" for s in TINY]])
    return result


def test_a_vit_token_map_drops_the_class_token_and_keeps_the_patch_grid():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # class token + a 2 x 2 patch grid
    grid = token_grid(tokens)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[0, :, 0, 1], tokens[0, 2]) and torch.equal(grid[1, :, 1, 0], tokens[1, 3])


def test_a_vit_past_its_last_block_has_no_patch_evidence_so_grad_cam_reads_the_last_norm():
    model, _ = build_network("vit_b_16", "none")
    past = ExplainedNetwork("vit_b_16", model.eval(), model.get_submodule(get_spec("vit_b_16").last_block),
                            [str(i) for i in range(1000)], "fine-tuned head", "", {}, lambda t: np.zeros(len(t), bool))
    assert np.abs(gradcam_maps(past, torch.rand(1, 3, 224, 224), np.array([3]), 1, "cpu")).max() == 0


def planted_network() -> ExplainedNetwork:
    """Logit 1 is the mean activation of a positive convolution: its evidence is wherever the image is bright."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    head = nn.Linear(4, 2)
    with torch.no_grad():
        conv.weight.abs_(), conv.bias.zero_(), head.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
    return ExplainedNetwork("tiny", model, model[0], ["dark", "bright"], "fine-tuned head", "planted",
                            {"weights": "none", "pretrained": False}, lambda t: np.zeros(len(t), bool))


def test_grad_cam_points_at_the_patch_that_carries_the_class():
    images = torch.zeros(3, 3, 32, 32)
    masks = np.zeros((3, 32, 32), bool)
    for i, (y, x) in enumerate([(0, 0), (20, 4), (10, 22)]):
        images[i, :, y:y + 8, x:x + 8] = 1.0
        masks[i, y:y + 8, x:x + 8] = True
    maps = gradcam_maps(planted_network(), images, np.array([1, 1, 1]), batch_size=2, device="cpu")
    scores = pointing(maps, masks)
    assert (scores["pointing_ratio"] > 2).all(), scores
    assert np.allclose(scores["mask_share"], 64 / 1024)
    uniform = pointing(np.ones((1, 32, 32)), masks[:1])
    assert uniform["pointing_ratio"][0] == pytest.approx(1.0)
    assert np.isnan(pointing(np.zeros((1, 32, 32)), masks[:1])["pointing_ratio"][0])


def test_rank_correlation_of_maps():
    rng = np.random.default_rng(0)
    a = rng.random((4, 8, 8))
    assert rank_correlation(a, a) == pytest.approx([1.0] * 4)
    assert rank_correlation(a, -a) == pytest.approx([-1.0] * 4)
    assert abs(rank_correlation(a, rng.random((4, 8, 8))).mean()) < 0.3
    assert np.isnan(rank_correlation(a[:1], np.zeros((1, 8, 8)))[0])


@pytest.mark.parametrize("classes", [3, 2])
def test_a_linear_probe_is_the_logistic_regression_folded_into_one_layer(classes):
    rng = np.random.default_rng(1)
    X = (rng.normal(size=(120, 6)) * [1, 5, 0.1, 2, 3, 1] + 4).astype(np.float32)
    y = np.array(list("abc"[:classes]) * (120 // classes))
    X[y == "a", 0] += 2
    linear, names = probe_weights(X, y, "sklearn", 0)
    mean, std = X.mean(axis=0), X.std(axis=0) + 1e-6
    want = LogisticRegression(max_iter=2000, random_state=0).fit((X - mean) / std, y).predict_proba((X - mean) / std)
    with torch.no_grad():
        got = torch.softmax(linear(torch.from_numpy(X)), 1).numpy()
    assert names == list("abc"[:classes]) and np.abs(got - want).max() < 1e-4


def test_a_probe_network_rebuilt_from_the_store_reproduces_its_stored_features(run):
    net = from_probe(run / "features.zarr", None, "sklearn", 0)
    assert net.kind == "linear probe" and net.classes == sorted(net.classes) and len(net.classes) == 5
    manifest = read_manifest(run / "manifest.parquet")
    cells = read_cells(manifest.table.head(6), manifest, load_config(None, TINY))
    store = FeatureStore.open(run / "features.zarr")
    rows = store.rows()
    where = [int(np.flatnonzero((rows["cell_id"] == c).to_numpy() & (rows["aug_index"] <= 0).to_numpy())[0])
             for c in cells.table["cell_id"]]
    stored = store.read(store.features("tiny").path)[where].astype(np.float32)
    with torch.no_grad():
        rebuilt = net.model[0](cells.normalised(net.spec.normalization)).numpy()
    assert np.abs(rebuilt - stored).max() <= 2e-3 * np.abs(stored).max()
    randomised = net.randomised(1)
    assert torch.equal(randomised.model[1].weight, net.model[1].weight)
    assert not torch.equal(next(randomised.model[0].parameters()), next(net.model[0].parameters()))
    assert any(m is randomised.layer for m in randomised.model.modules())


def test_gradcam_on_a_store_writes_maps_per_class_numbers_and_a_grid(run, tmp_path):
    out = tmp_path / "gc"
    result = cli("gradcam", run / "features.zarr", run / "manifest.parquet", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    cells = pd.read_csv(out / "cells.csv")
    maps = np.load(out / "maps.npy")
    assert maps.shape == (15, 32, 32) and len(cells) == 15 and set(cells["split"]) == {"test"}
    assert summary["all"]["cells"] == 15 and set(summary["per_class"]) == set(cells["label"])
    assert summary["split_protocol"] == "patient-grouped split" and summary["weights_words"] == "NOT pretrained"
    assert not cells["in_training"].any() and summary["cells_in_training"] == 0
    assert "random already" in result.output and "rho_randomised" not in cells  # no test of a random network
    assert summary["all"]["pointing_ratio_median"] is not None and "pointing_ratio_average_map" in cells
    assert (out / "gradcam.png").stat().st_size > 20_000 and (out / "gradcam.svg").is_file()
    trained_on = cli("gradcam", run / "features.zarr", run / "manifest.parquet", "-o", tmp_path / "train",
                     "--split", "train", "--set", "explain.gradcam.sanity=false")
    assert trained_on.exit_code == 0 and "trained on" in trained_on.output
    assert pd.read_csv(tmp_path / "train" / "cells.csv")["in_training"].all()
    unsplit = cli("gradcam", run / "features.zarr", run / "demo", "-o", tmp_path / "folder")
    assert unsplit.exit_code == 0 and "the source has no split" in unsplit.output


def test_gradcam_refuses_what_it_cannot_explain(run, tmp_path):
    missing = cli("gradcam", run / "features.zarr", run / "manifest.parquet", "-o", tmp_path / "a", "--backbone",
                  "resnet101")
    assert missing.exit_code == 2 and "has no backbone 'resnet101'; it has tiny" in missing.output
    split = cli("gradcam", run / "features.zarr", run / "manifest.parquet", "-o", tmp_path / "b", "--split", "holdout")
    assert split.exit_code == 2 and "no cells in split 'holdout'" in split.output
    nolayer = dataclasses.replace(get_spec("tiny"), cam_layer="features.9")
    with pytest.raises(ConfigError, match="has no layer 'features.9'"):
        gradcam_layer(build_network("tiny", "none")[0], nolayer)


@pytest.fixture(scope="module")
def finetuned(run) -> Path:
    """Two steps of fine-tuning the tiny network: a checkpoint with its own 5-class head."""
    cfg = load_config(None, TINY + ["finetune.backbone=tiny", "finetune.weights=none", "finetune.max_steps=2",
                                    "finetune.batch_size=8", "finetune.precision=fp32"])
    return workflow.finetune(run / "manifest.parquet", run / "ft", cfg).folder


def test_a_fine_tuned_checkpoint_is_explained_through_its_own_head(run, finetuned, tmp_path):
    net = from_checkpoint(finetuned)
    assert net.kind == "fine-tuned head" and len(net.classes) == 5 and net.made_with["loader"]["image_size"] == 32
    out = tmp_path / "gc"
    result = cli("gradcam", finetuned, run / "manifest.parquet", "-o", out, "--target", "true")
    assert result.exit_code == 0, result.output
    cells = pd.read_csv(out / "cells.csv")
    assert (cells["target"] == cells["label"]).all() and not cells["in_training"].any()
    summary = json.loads((out / "summary.json").read_text())
    assert "fine-tuned on" in summary["weights_words"] and "randomised_blank" in summary["all"]
    assert cells["rho_randomised"].dropna().between(-1, 1).all()


def test_a_checkpoint_whose_head_does_not_match_its_classes_is_refused(finetuned, tmp_path):
    folder = tmp_path / "ft"
    folder.mkdir()
    for name in ("finetune.json", "seen_cells.csv", "config.yaml"):
        (folder / name).write_bytes((finetuned / name).read_bytes())
    state = get_spec("tiny").reset_head(build_network("tiny", "none")[0], 3).state_dict()
    torch.save(state, folder / "best.pt")
    with pytest.raises(DataError, match="its head predicts 3 classes, but .*finetune.json names 5"):
        from_checkpoint(folder)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "best.pt").write_bytes((finetuned / "best.pt").read_bytes())
    with pytest.raises(DataError, match="no finetune.json beside it, so its backbone, its classes"):
        from_checkpoint(alone / "best.pt")


def test_occlusion_maps_the_patch_a_classifier_reads():
    """A classifier whose p(bright) is the mean of the top-left 8 x 8 corner: occluding there drops it."""

    class Corner:
        device = "cpu"

        def __call__(self, pixels):
            p = pixels[:, :, :8, :8].mean(dim=(1, 2, 3))
            return torch.stack([1 - p, p], 1)

    images = torch.ones(2, 3, 32, 32)
    maps = occlusion_maps(Corner(), images, np.array([1, 1]), window=8, stride=8, rows_per_pass=5)
    assert maps.shape == (2, 32, 32)
    assert np.allclose(maps[:, :8, :8], 1.0) and np.allclose(maps[:, 8:, :], 0) and np.allclose(maps[:, :, 8:], 0)


def test_occlusion_of_the_hybrid_starts_from_its_own_predictions_and_compares_with_grad_cam(run, tmp_path):
    assert cli("gradcam", run / "features.zarr", run / "manifest.parquet", "-o", tmp_path / "gc").exit_code == 0
    out = tmp_path / "oc"
    result = cli("occlusion", run / "model", run / "manifest.parquet", "-o", out, "--against", tmp_path / "gc",
                 "--set", "explain.occlusion.window=8", "--set", "explain.occlusion.stride=8")
    assert result.exit_code == 0, result.output
    cells = pd.read_csv(out / "cells.csv", dtype={"cell_id": str})
    assert list(cells["cell_id"]) == list(pd.read_csv(tmp_path / "gc" / "cells.csv", dtype={"cell_id": str})["cell_id"])
    model, info = load_model(run / "model")
    proba, rows = predict_store(model, FeatureStore.open(run / "features.zarr"), list(info["backbones"]), None, True)
    stored = proba[rows.reset_index().set_index("cell_id").loc[cells["cell_id"], "index"].to_numpy()]
    assert np.abs(stored.max(axis=1) - cells["p_predicted"]).max() < 1e-4  # the same features, the same model
    assert np.load(out / "maps.npy").shape == (15, 32, 32) and cells["rho_gradcam"].notna().any()
    assert json.loads((out / "summary.json").read_text())["all"]["rho_gradcam"] is not None
    assert (out / "occlusion.png").is_file()
    other = tmp_path / "other"
    other.mkdir()
    for name in ("cells.csv", "summary.json"):
        (other / name).write_bytes((tmp_path / "gc" / name).read_bytes())
    np.save(other / "maps.npy", np.zeros((15, 16, 16), np.float16))
    wrong = cli("occlusion", run / "model", run / "manifest.parquet", "-o", tmp_path / "oc2", "--against", other)
    assert wrong.exit_code == 3 and "does not hold one 32x32 map for each row" in wrong.output
    too_big = cli("occlusion", run / "model", run / "manifest.parquet", "-o", tmp_path / "oc3",
                  "--set", "explain.occlusion.window=64")
    assert too_big.exit_code == 2 and "larger than the 32 px images" in too_big.output
    itself = cli("occlusion", run / "model", run / "manifest.parquet", "-o", tmp_path / "oc4", "--against", out)
    assert itself.exit_code == 3 and "not a folder `aml-rapids gradcam` wrote" in itself.output


def test_embed_writes_coordinates_plots_and_their_quality(run, tmp_path):
    out = tmp_path / "em"
    result = cli("embed", run / "features.zarr", "-o", out, "--model", run / "model")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "embed.json").read_text())
    assert summary["rows"] == 160 and set(summary["spaces"]) == {"tiny", "classifier-pca"}
    for space, scores in summary["spaces"].items():
        coords = pd.read_parquet(out / f"{space}-tsne.parquet")
        assert list(coords.columns) == ["cell_id", "label", "patient", "cohort", "split", "x", "y"]
        assert len(coords) == 160 and coords["cell_id"].is_unique and np.isfinite(coords[["x", "y"]]).all().all()
        assert 0.5 < scores["trustworthiness"] <= 1 and 0 <= scores["knn_agreement_2d"] <= 1
        assert scores["knn_folds"] == "5-fold, patient-grouped" and (out / f"{space}-tsne.svg").is_file()
    (tmp_path / "um").mkdir()
    (tmp_path / "um" / "holiday.png").write_bytes(b"mine")  # not this command's: never replaced
    refused = cli("embed", run / "features.zarr", "-o", tmp_path / "um", "--overwrite")
    assert refused.exit_code == 8 and (tmp_path / "um" / "holiday.png").read_bytes() == b"mine"
    (tmp_path / "um" / "holiday.png").unlink()
    umap = cli("embed", run / "features.zarr", "-o", tmp_path / "um", "--method", "umap", "--max-rows", "50",
               "--set", "explain.embed.neighbors=5")
    assert umap.exit_code == 0, umap.output
    assert len(pd.read_parquet(tmp_path / "um" / "tiny-umap.parquet")) == 50


def test_a_stratified_sample_keeps_every_class():
    rows = pd.DataFrame({"label": ["a"] * 90 + ["b"] * 9 + ["c"]})
    picked = embedding.stratified_rows(rows, 20, 0)
    counts = rows.iloc[picked]["label"].value_counts()
    assert len(picked) <= 20 and counts["a"] == 18 and counts["b"] == 1 and counts["c"] == 1


def test_embed_refuses_too_few_rows_a_missing_backbone_and_more_than_memory(run, tmp_path, monkeypatch):
    few = cli("embed", run / "features.zarr", "-o", tmp_path / "a", "--max-rows", "10")
    assert few.exit_code == 2 and "too few for t-SNE with perplexity 5" in few.output
    missing = cli("embed", run / "features.zarr", "-o", tmp_path / "b", "--backbone", "vgg16")
    assert missing.exit_code == 2 and "has no backbone vgg16" in missing.output
    monkeypatch.setattr(embedding, "available_bytes", lambda: 1000)
    big = cli("embed", run / "features.zarr", "-o", tmp_path / "c")
    assert big.exit_code == 2 and "GiB available: lower explain.embed.max_rows" in big.output


def test_galleries_show_the_most_confident_right_and_wrong_cells_and_wrong_patients_first():
    table = pd.DataFrame({
        "cell_id": [f"c{i}" for i in range(6)], "cohort": "x", "patient": ["p1", "p1", "p1", "p2", "p2", "p2"],
        "label": ["a", "a", "a", "b", "b", "b"], "predicted": ["a", "a", "b", "a", "a", "b"],
        "p_a": [0.6, 0.9, 0.3, 0.8, 0.7, 0.4], "p_b": [0.4, 0.1, 0.7, 0.2, 0.3, 0.6]})
    rows = dict(class_rows(table, ["a", "b"], per_class=1))
    assert list(rows["a\ncorrect"]["cell_id"]) == ["c1"] and list(rows["a\nwrong"]["cell_id"]) == ["c2"]
    assert list(rows["b\nwrong"]["cell_id"]) == ["c3"] and rows["b\nwrong"]["p_of"].iloc[0] == "a"
    settings = load_config().explain.gallery.model_copy(update={"per_patient": 2})
    patients = patient_rows(table, ["a", "b"], settings)
    assert patients[0][0].startswith("p2\ntrue b\ncalled a")  # called wrongly: first
    assert list(patients[0][1]["cell_id"]) == ["c3", "c4"] and list(patients[1][1]["cell_id"]) == ["c1", "c0"]
    copies = table.assign(sha256=["x", "x", "y", "z", "w", "v"])  # c0 is c1's image under another name
    assert list(patient_rows(copies, ["a", "b"], settings)[1][1]["cell_id"]) == ["c1", "c2"]


def test_gallery_from_an_evaluation(run, tmp_path):
    out = tmp_path / "ga"
    result = cli("gallery", run / "model" / "eval-test", run / "manifest.parquet", "-o", out,
                 "--set", "explain.gallery.per_class=2", "--set", "explain.gallery.patients=2")
    assert result.exit_code == 0, result.output
    listing = pd.read_csv(out / "gallery.csv")
    assert {"classes.png", "patients.png"} <= {p.name for p in out.iterdir()}
    assert set(listing["group"].str.split(" ").str[-1]) >= {"correct"} and listing["p"].between(0, 1).all()
    other = cli("gallery", run / "model" / "eval-test", tmp_path / "nope.parquet", "-o", tmp_path / "gb")
    assert other.exit_code == 3 and "is not a file" in other.output
    listing.to_csv(tmp_path / "tiles.csv", index=False)  # p and p_of: not a prediction table
    tiles = cli("gallery", tmp_path / "tiles.csv", run / "manifest.parquet", "-o", tmp_path / "gc")
    assert tiles.exit_code == 3 and "not a prediction table" in tiles.output


def test_a_patient_level_prediction_makes_a_gallery_of_the_most_attended_cells(run, tmp_path):
    quick = ["--set", "patients.epochs=3", "--set", "patients.ensemble=1", "--set", "patients.pca_components=8"]
    result = cli("train", run / "features.zarr", "--level", "patient", "-o", tmp_path / "mil", *quick)
    assert result.exit_code == 0, result.output
    assert cli("predict", tmp_path / "mil", run / "features.zarr", "-o", tmp_path / "p").exit_code == 0
    result = cli("gallery", tmp_path / "p", run / "manifest.parquet", "-o", tmp_path / "g", "--set",
                 "explain.gallery.per_patient=3")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "g").iterdir()} >= {"patients.png", "gallery.csv"}
    assert not (tmp_path / "g" / "classes.png").exists()  # a patient model's p_<class> are no cell's
    listing = pd.read_csv(tmp_path / "g" / "gallery.csv")
    cells = pd.read_csv(tmp_path / "p" / "predictions.csv").set_index("cell_id")
    assert (listing["p_of"] == "attention").all()
    assert np.allclose(listing["p"], cells.loc[listing["cell_id"], "attention"])
    ranks = cells.loc[listing["cell_id"], "attention_rank"].to_numpy().reshape(-1, 3)
    assert (ranks == [1, 2, 3]).all()  # each patient's three most attended cells, best first (no copies here)
    refused = cli("embed", run / "features.zarr", "--model", tmp_path / "mil", "-o", tmp_path / "e")
    assert refused.exit_code == 2 and "patient-level model" in refused.output


def test_the_report_shows_the_explanations_below_a_run(run, finetuned):
    """The run folder also holds a fine-tuning, whose head's test report rests on no store."""
    from aml_rapids.report.render import render_report

    assert cli("gradcam", run / "features.zarr", run / "manifest.parquet", "-o", run / "gradcam").exit_code == 0
    assert cli("embed", run / "features.zarr", "-o", run / "embed").exit_code == 0
    page = render_report(run).read_text()
    assert "<h2>Explanations</h2>" in page and 'alt="gradcam.png"' in page and 'alt="tiny-tsne.png"' in page
    assert "Grad-CAM of tiny at features.2 through a linear probe" in page and "trustworthiness" in page
    assert f"Rests on: fine-tuning {finetuned}" in page
