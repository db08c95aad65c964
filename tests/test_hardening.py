"""Everyday mistakes that used to give wrong results or tracebacks: each is now a refusal with its own exit code
and one line naming the problem, or a warning, and nothing already made is lost or mixed."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from aml_rapids.cli import app
from aml_rapids.config import IndexConfig
from aml_rapids.data.manifest import build_manifest, read_manifest, write_manifest
from aml_rapids.data.synthetic import write_demo_dataset
from aml_rapids.features.store import FeatureStore
from aml_rapids.provenance import run_records

from conftest import write_image

runner = CliRunner()
TINY = [a for kv in ("features.backbones=[{name: tiny, weights: none, engine: torch, precision: fp32}]", "loader.batch_size=16",
                     "features.chunk_batches=2", "loader.image_size=32", "loader.device=cpu",
                     "features.store_dtype=float32") for a in ("--set", kv)]
SMALL = [a for kv in ("classify.pca_components=4", "classify.rf_trees=10", "classify.folds=2",
                      "classify.backend=sklearn") for a in ("--set", kv)]


def cli(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo run: manifest (image-level split), store and model of the tiny backbone."""
    run = tmp_path_factory.mktemp("trained")
    write_demo_dataset(run / "data", 2, 6, seed=3)
    assert cli("index", run / "data", "-o", run)[0] == 0
    assert cli("split", run / "manifest.parquet", "--method", "image")[0] == 0
    assert cli("extract", run / "manifest.parquet", *TINY)[0] == 0
    code, out = cli("train", run / "features.zarr", "-o", run / "model", *SMALL)
    assert code == 0, out
    return run


def test_failed_rows_exit_6_are_retried_on_a_rerun_and_can_be_accepted(tmp_path):
    write_demo_dataset(tmp_path / "data", 1, 6, seed=0)
    cli("index", tmp_path / "data", "-o", tmp_path / "run")
    manifest = tmp_path / "run" / "manifest.parquet"
    victim = read_manifest(manifest).paths()[4]
    kept = victim.read_bytes()
    victim.unlink()
    code, out = cli("extract", manifest, *TINY)
    assert code == 6 and "1 cells could not be read" in out and victim.name in out and "--allow-failed" in out
    assert FeatureStore.open(tmp_path / "run" / "features.zarr").summary()["failed"] == 1
    assert cli("extract", manifest, *TINY, "--allow-failed")[0] == 0  # still missing: accepted when asked
    victim.write_bytes(kept)
    code, out = cli("extract", manifest, *TINY)
    assert code == 0 and "retried 1 rows that had failed before" in out
    summary = FeatureStore.open(tmp_path / "run" / "features.zarr").summary()
    assert summary["failed"] == 0 and summary["ok"] == 30


def test_a_new_split_into_an_existing_store_is_refused(trained, tmp_path):
    shutil.copy(trained / "manifest.parquet", tmp_path / "manifest.parquet")
    cli("split", tmp_path / "manifest.parquet", "--method", "image", "--seed", "5")
    code, out = cli("extract", tmp_path / "manifest.parquet", "-s", trained / "features.zarr", *TINY)
    assert code == 2 and "another split than the store holds" in out and "extract into a new store" in out
    relabelled = read_manifest(trained / "manifest.parquet")
    relabelled.table.loc[3, "label"] = "renamed"
    write_manifest(relabelled, tmp_path / "relabelled.parquet")
    code, out = cli("extract", tmp_path / "relabelled.parquet", "-s", trained / "features.zarr", *TINY)
    assert code == 2 and "another label than the store holds" in out and "manifest 'renamed'" in out


def test_predict_refuses_a_used_folder_and_overwrite_replaces_only_its_own_files(trained, tmp_path):
    write_demo_dataset(tmp_path / "new", 1, 3, seed=11)
    out = tmp_path / "pred"
    assert cli("predict", trained / "model", tmp_path / "new", "-o", out)[0] == 0
    before = pd.read_csv(out / "predictions.csv")
    code, message = cli("predict", trained / "model", tmp_path / "new", "-o", out)
    assert code == 8 and "already holds an earlier run's results" in message and "--overwrite" in message
    pd.testing.assert_frame_equal(pd.read_csv(out / "predictions.csv"), before)  # nothing appended or lost
    assert cli("predict", trained / "model", tmp_path / "new", "-o", out, "--overwrite")[0] == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "predictions.csv"), before)
    (out / "notes.txt").write_text("mine")
    code, message = cli("predict", trained / "model", tmp_path / "new", "-o", out, "--overwrite")
    assert code == 8 and "notes.txt" in message and (out / "notes.txt").read_text() == "mine"


def test_an_interrupted_prediction_resumes_and_overwrite_says_what_it_replaces(trained, tmp_path):
    write_demo_dataset(tmp_path / "new", 1, 3, seed=12)
    write_demo_dataset(tmp_path / "other", 1, 2, seed=13)
    out = tmp_path / "pred"
    assert cli("predict", trained / "model", tmp_path / "new", "-o", out)[0] == 0
    before = pd.read_csv(out / "predictions.csv")
    for name in ("predictions.csv", "patients.csv", "drift.json", "drift.png", "drift.svg"):
        (out / name).unlink()  # as a kill during extraction leaves it: a store, no results, no run record
    shutil.rmtree(out / "runs")
    code, message = cli("predict", trained / "model", tmp_path / "other", "-o", out)
    assert code == 8 and "unfinished prediction of" in message and not (out / "predictions.csv").exists()
    code, message = cli("predict", trained / "model", tmp_path / "new", "-o", out)
    assert code == 0 and f"resuming the unfinished prediction in {out}" in message
    pd.testing.assert_frame_equal(pd.read_csv(out / "predictions.csv"), before)
    code, message = cli("predict", trained / "model", tmp_path / "new", "-o", out, "--overwrite")
    assert code == 0 and "--overwrite: replacing the earlier results" in message and "predictions.csv" in message
    shutil.rmtree(out / "runs")  # as a kill in the drift check leaves it: predictions, no run record
    (out / "drift.json").unlink()
    code, message = cli("predict", trained / "model", tmp_path / "new", "-o", out)
    assert code == 0 and "resuming" in message and (out / "drift.json").is_file()


def test_train_keeps_to_new_folders_or_its_own_earlier_model(trained, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.yaml").write_text("my settings")
    code, out = cli("train", trained / "features.zarr", "-o", tmp_path / "mine", *SMALL, "--overwrite")
    assert code == 8 and "config.yaml" in out and (tmp_path / "mine" / "config.yaml").read_text() == "my settings"
    model = tmp_path / "model"
    shutil.copytree(trained / "model", model)
    (model / "eval-test").mkdir()
    code, out = cli("train", trained / "features.zarr", "-o", model, *SMALL)
    assert code == 8 and "--overwrite" in out
    assert cli("train", trained / "features.zarr", "-o", model, *SMALL, "--overwrite")[0] == 0
    assert not (model / "eval-test").exists()  # the old model's evaluation went with it


def test_same_named_patients_of_two_cohorts_stay_two_patients(trained, tmp_path):
    for cohort in ("north", "south"):
        write_demo_dataset(tmp_path / cohort, 1, 2, seed=20 + len(cohort))
    rows = [f"{c}/{p.relative_to(tmp_path / c)},{p.parent.parent.name},P1,{c}"
            for c in ("north", "south") for p in sorted((tmp_path / c).rglob("*.tif"))]
    (tmp_path / "cells.csv").write_text("path,label,patient,cohort\n" + "\n".join(rows) + "\n")
    code, out = cli("predict", trained / "model", tmp_path / "cells.csv", "-o", tmp_path / "pred")
    assert code == 0, out
    patients = pd.read_csv(tmp_path / "pred" / "patients.csv")
    assert sorted(zip(patients["cohort"], patients["patient"])) == [("north", "P1"), ("south", "P1")]
    assert set(patients["n_cells"]) == {10}


def test_evaluate_refuses_cells_the_model_trained_on_even_copied_elsewhere(trained, tmp_path):
    shutil.copytree(trained / "data", tmp_path / "copy")
    cli("index", tmp_path / "copy", "-o", tmp_path / "run")
    cli("split", tmp_path / "run" / "manifest.parquet", "--method", "image", "--seed", "9")
    assert cli("extract", tmp_path / "run" / "manifest.parquet", *TINY)[0] == 0
    code, out = cli("evaluate", trained / "model", tmp_path / "run" / "features.zarr", "-o", tmp_path / "eval")
    assert code == 2 and "are cells model" in out and "trained on (same content" in out
    assert not (tmp_path / "eval" / "metrics.json").exists()
    code, out = cli("predict", trained / "model", tmp_path / "run" / "features.zarr", "-o", tmp_path / "pred")
    assert code == 0 and "were in the model's training set" in out
    cells = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    train_cells = pd.read_parquet(trained / "model" / "training_cells.parquet")
    assert cells["in_training"].sum() == len(train_cells) > 0


def test_evaluate_refuses_training_cells_saved_again_in_another_format(trained, tmp_path):
    """Same pixels, other bytes: a TIFF re-saved as PNG is still a cell the model trained on."""
    for tif in (trained / "data").rglob("*.tif"):
        png = tmp_path / "png" / tif.relative_to(trained / "data").with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.open(tif).save(png)
    cli("index", tmp_path / "png", "-o", tmp_path / "run")
    cli("split", tmp_path / "run" / "manifest.parquet", "--method", "image", "--seed", "9")
    assert cli("extract", tmp_path / "run" / "manifest.parquet", *TINY)[0] == 0
    code, out = cli("evaluate", trained / "model", tmp_path / "run" / "features.zarr", "-o", tmp_path / "eval")
    assert code == 2 and "trained on (same content" in out and ".png" in out


def test_features_made_otherwise_than_the_models_are_refused(trained, tmp_path):
    write_demo_dataset(tmp_path / "new", 1, 2, seed=12)
    code, out = cli("predict", trained / "model", tmp_path / "new", "-o", tmp_path / "p",
                    "--set", "segmentation.enabled=false")
    assert code == 2 and "differs in segmentation.enabled" in out and not (tmp_path / "p" / "features.zarr").exists()
    assert cli("extract", trained / "manifest.parquet", "-s", tmp_path / "other.zarr", *TINY,
               "--set", "loader.image_size=48")[0] == 0
    code, out = cli("evaluate", trained / "model", tmp_path / "other.zarr", "-o", tmp_path / "e")
    assert code == 2 and "differs in image_size" in out


def test_a_damaged_or_edited_model_folder_is_a_data_error(trained, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained / "model", model)
    (model / "model.json").write_text("{ not json")
    code, out = cli("evaluate", model, trained / "features.zarr", "-o", tmp_path / "e")
    assert code == 3 and "model.json is damaged" in out
    shutil.copy(trained / "model" / "model.json", model / "model.json")
    (model / "training_cells.parquet").write_bytes(b"PAR1 edited")
    code, out = cli("evaluate", model, trained / "features.zarr", "-o", tmp_path / "e")
    assert code == 3 and "training_cells.parquet is not the file model.json was written with" in out


@pytest.mark.parametrize("command", [
    lambda run, f: ("index", run / "data", "-o", f / "out"),
    lambda run, f: ("extract", run / "manifest.parquet", "-s", f / "s.zarr", *TINY),
    lambda run, f: ("train", run / "features.zarr", "-o", f / "model", *SMALL),
    lambda run, f: ("evaluate", run / "model", run / "features.zarr", "-o", f / "eval"),
    lambda run, f: ("predict", run / "model", run / "features.zarr", "-o", f / "pred"),
    lambda run, f: ("run", "-o", f / "demo"),
], ids=["index", "extract", "train", "evaluate", "predict", "run"])
def test_a_file_in_the_way_of_an_output_folder_is_exit_8_before_any_work(trained, tmp_path, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    code, out = cli(*command(trained, blocker))
    assert code == 8 and f"{blocker} is a file, not a folder" in out


def test_config_mistakes_are_exit_2_in_one_line(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("split: {seed: 1} # caf\xe9".encode("latin-1"))
    for args, words in [(["-c", tmp_path], "cannot be read"), (["-c", tmp_path / "latin1.yaml"], "cannot be read"),
                        (["--set", "loader.batch_size=many"], "loader.batch_size"),
                        (["--set", "split.train=0.9"], "must sum to 1")]:
        code, out = cli("config", *args)
        assert code == 2 and words in out
    code, out = cli("extract", tmp_path / "none.parquet")
    assert code == 3 and "does not exist" in out


def test_an_unknown_backbone_is_a_config_error(trained, tmp_path):
    code, out = cli("extract", trained / "manifest.parquet", "-s", tmp_path / "s.zarr", *TINY,
                    "--set", "features.backbones=[{name: resnet9000, weights: none}]")
    assert code == 2 and "unknown backbone 'resnet9000'" in out


def test_user_text_with_brackets_is_printed_literally(tmp_path):
    """Class "[" and file "]broken.png" make the path .../[/]broken.png: rich markup would crash on it."""
    for label in ("[bold]blast", "[", "mono[cyte]"):
        for i in range(3):
            write_image(tmp_path / "data" / label / f"[red]cell {i}.png", fmt="PNG")
    (tmp_path / "data" / "[" / "]broken.png").write_bytes(b"not a png")
    code, out = cli("index", tmp_path / "data", "-o", tmp_path / "run")
    assert code == 0
    assert "[bold]blast" in out and "mono[cyte]" in out and "[/]broken.png" in out
    assert set(read_manifest(tmp_path / "run" / "manifest.parquet").table["label"]) == {"[bold]blast", "[",
                                                                                          "mono[cyte]"}


def test_any_decoder_failure_or_odd_name_rejects_one_file_and_index_goes_on(tiny_tree, monkeypatch):
    odd = tiny_tree / "a" / "a_p0" / "odd.tif"
    write_image(odd)
    bad_name = Path(tiny_tree / "b" / "b_p0").joinpath(b"caf\xe9.tif".decode("utf-8", "surrogateescape"))
    shutil.copy(tiny_tree / "b" / "b_p0" / "img0.tif", bad_name)
    real_open, odd_bytes = Image.open, odd.read_bytes()

    def open_that_explodes(fp, *args, **kwargs):  # as a decoder does on an odd header
        if fp.getvalue() == odd_bytes:
            raise struct.error("unpack requires a buffer of 4 bytes")
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_that_explodes)
    result = build_manifest(tiny_tree, IndexConfig())
    why = {Path(p.path).name: p.reason for p in result.problems}
    assert "cannot be decoded (error: unpack requires" in why["odd.tif"] and "not valid UTF-8" in why["caf\\xe9.tif"]
    assert len(result.manifest.table) == 60


def test_nothing_usable_still_writes_the_rejects_file(tmp_path):
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "data" / "x" / "a.tif").write_bytes(b"")
    (tmp_path / "data" / "x" / "b.png").write_text("text")
    code, out = cli("index", tmp_path / "data", "-o", tmp_path / "run")
    assert code == 3 and "no usable images" in out
    rejects = pd.read_csv(tmp_path / "run" / "rejects.csv")
    assert sorted(Path(p).name for p in rejects["path"] if p.endswith(("a.tif", "b.png"))) == ["a.tif", "b.png"]


def test_csv_paths_outside_its_folder_are_accepted_with_a_warning_and_duplicates_rejected(tmp_path):
    write_image(tmp_path / "elsewhere" / "x.png", fmt="PNG")
    write_image(tmp_path / "lists" / "y.png", fmt="PNG")
    (tmp_path / "lists" / "cells.csv").write_text("path,label\n../elsewhere/x.png,a\ny.png,b\ny.png,b\n")
    code, out = cli("index", tmp_path / "lists" / "cells.csv", "-o", tmp_path / "run")
    assert code == 0 and "1 files lie outside the CSV's folder" in out and "elsewhere/x.png" in out
    assert "listed twice" in out
    [record] = run_records(tmp_path / "run", "index")
    assert record["details"]["outside_root"] == [str(tmp_path / "lists" / "../elsewhere/x.png")]
    assert len(read_manifest(tmp_path / "run" / "manifest.parquet").table) == 2


def test_a_damaged_store_is_named_not_a_codec_traceback(trained, tmp_path):
    lost = tmp_path / "lost.zarr"
    shutil.copytree(trained / "features.zarr", lost)
    (lost / "rows" / "status" / "zarr.json").unlink()
    code, out = cli("train", lost, "-o", tmp_path / "m1", *SMALL)
    assert code == 3 and "is damaged: rows/status missing" in out
    torn = tmp_path / "torn.zarr"
    shutil.copytree(trained / "features.zarr", torn)
    (torn / "features" / "tiny" / "c" / "0" / "0").write_bytes(b"\x00garbage")  # chunk (0, 0)
    code, out = cli("train", torn, "-o", tmp_path / "m2", *SMALL)
    assert code == 3 and "is damaged: cannot read features/tiny" in out
    (tmp_path / "a_file").write_text("x")
    code, out = cli("extract", trained / "manifest.parquet", "-s", tmp_path / "a_file", *TINY)
    assert code == 3 and "is a file, not a feature store" in out and not (tmp_path / "a_file.lock").exists()


def test_a_manifest_that_was_emptied_or_edited_is_a_data_error(trained, tmp_path):
    manifest = read_manifest(trained / "manifest.parquet")
    empty = read_manifest(trained / "manifest.parquet")
    empty.table = empty.table.iloc[:0]
    write_manifest(empty, tmp_path / "empty.parquet")
    code, out = cli("extract", tmp_path / "empty.parquet", "-s", tmp_path / "s.zarr", *TINY)
    assert code == 3 and "lists no cells" in out
    manifest.table["width"] = "wide"
    write_manifest(manifest, tmp_path / "edited.parquet")
    code, out = cli("extract", tmp_path / "edited.parquet", "-s", tmp_path / "s.zarr", *TINY)
    assert code == 3 and "column(s) width hold missing or non-integer values" in out


def test_a_stacking_fold_with_a_single_class_is_named():
    import numpy as np

    from aml_rapids.classify.model import FeatureStackingClassifier
    from aml_rapids.errors import DataError

    X = np.random.default_rng(0).normal(size=(12, 8))
    y = np.array(["a"] * 10 + ["b"] * 2)
    groups = np.array(["p1"] * 5 + ["p2"] * 5 + ["p3"] * 2)  # b's only patient is held out in one fold
    with pytest.raises(DataError, match="training part holds a single class.*lower classify.folds"):
        FeatureStackingClassifier(block_dims=(8,), pca_components=2, rf_trees=3, folds=2,
                                  backend="sklearn").fit(X, y, groups=groups)


def test_a_fifo_or_a_folder_named_like_an_image_is_rejected_without_blocking(tmp_path):
    import os

    write_demo_dataset(tmp_path / "data", 1, 2, seed=4)
    os.mkfifo(tmp_path / "data" / "NPM1" / "synthetic_NPM1_00" / "pipe.tif")
    (tmp_path / "data" / "NPM1" / "synthetic_NPM1_00" / "folder.tif").mkdir()
    result = build_manifest(tmp_path / "data", IndexConfig())
    why = {Path(p.path).name: p.reason for p in result.problems}
    assert why["pipe.tif"] == "not a regular file (a FIFO)" and len(result.manifest.table) == 10
    (tmp_path / "cells.csv").write_text("path,label\ndata/NPM1/synthetic_NPM1_00/pipe.tif,a\n"
                                        "data/NPM1/synthetic_NPM1_00/cell_0000.tif,a\n")
    why = {Path(p.path).name: p.reason for p in build_manifest(tmp_path / "cells.csv", IndexConfig()).problems}
    assert why["pipe.tif"].endswith("but not a regular file (a FIFO)")


def test_patients_under_two_classes_are_counted_once_and_warned_about(tmp_path):
    for label in ("NPM1", "control"):
        for i in range(2):
            write_image(tmp_path / "data" / label / "patient_1" / f"{i}.png", color=(40 * i, 90, 200), fmt="PNG")
    code, out = cli("index", tmp_path / "data", "-o", tmp_path / "run")
    assert code == 0 and "4 cells, 1 patients" in out
    assert "1 patients have cells under more than one class (e.g. patient_1 of cohort data: NPM1, control)" in out


def test_an_unfinished_store_is_refused_by_every_reader(trained, tmp_path):
    store = tmp_path / "unfinished.zarr"
    shutil.copytree(trained / "features.zarr", store)
    opened = FeatureStore.open(store, mode="r+")
    test_rows = opened.rows().index[opened.rows()["split"] == "test"]
    opened.group["progress/chunk_done"][int(test_rows[0]) // opened.chunk_rows] = False
    opened.group["rows/status"][int(test_rows[0])] = 0  # as a killed extraction leaves it
    code, out = cli("evaluate", trained / "model", store, "-o", tmp_path / "e")
    assert code == 3 and "is not complete: 1 rows of split(s) test are not extracted yet" in out
    code, out = cli("evaluate", trained / "model", store, "--split", "tset", "-o", tmp_path / "e")
    assert code == 2 and "has no split tset; it has test, train, val" in out


def test_a_lost_chunk_file_is_found_and_computed_again(trained, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(trained / "features.zarr", store)
    before = (store / "features" / "tiny" / "c" / "1" / "0").read_bytes()
    (store / "features" / "tiny" / "c" / "1" / "0").unlink()
    code, out = cli("train", store, "-o", tmp_path / "m", *SMALL)
    assert code == 3 and "hold NaN or Inf, though marked usable" in out
    code, out = cli("extract", trained / "manifest.parquet", "-s", store, *TINY)
    assert code == 0 and "1 chunks marked done had lost their files; computed again" in out
    assert (store / "features" / "tiny" / "c" / "1" / "0").read_bytes() == before


def test_predict_names_every_image_it_could_not_use(trained, tmp_path):
    write_demo_dataset(tmp_path / "new", 1, 2, seed=13)
    (tmp_path / "new" / "NPM1" / "synthetic_NPM1_00" / "zero.tif").write_bytes(b"")
    code, out = cli("predict", trained / "model", tmp_path / "new", "-o", tmp_path / "p")
    assert code == 6 and "1 cells could not be read" in out and "zero.tif" in out
    assert len(pd.read_csv(tmp_path / "p" / "predictions.csv")) == 10  # the rest were predicted
    assert pd.read_csv(tmp_path / "p" / "failed.csv")["reason"].str.contains("empty file").all()
    (tmp_path / "bad" / "c" / "p").mkdir(parents=True)
    (tmp_path / "bad" / "c" / "p" / "zero.tif").write_bytes(b"")
    code, out = cli("predict", trained / "model", tmp_path / "bad", "-o", tmp_path / "q")
    assert code == 3 and "no usable images" in out and (tmp_path / "q" / "failed.csv").is_file()


def test_demo_data_never_draws_into_a_real_dataset(tmp_path):
    write_image(tmp_path / "real" / "NPM1" / "patientA" / "a.png", fmt="PNG")
    code, out = cli("demo-data", "-o", tmp_path / "real", "--patients", "1", "--cells", "1")
    assert code == 8 and "not a demo set" in out and sorted(p.name for p in (tmp_path / "real").iterdir()) == ["NPM1"]


def test_a_store_from_before_pixel_hashes_and_fine_tuning_marks_still_opens_and_appends(tmp_path):
    write_demo_dataset(tmp_path / "data", 1, 2, seed=6)
    cli("index", tmp_path / "data", "-o", tmp_path / "run")
    manifest, store = tmp_path / "run" / "manifest.parquet", tmp_path / "run" / "features.zarr"
    first = read_manifest(manifest)
    first.table = first.table.iloc[:5]
    write_manifest(first, tmp_path / "first.parquet")
    assert cli("extract", tmp_path / "first.parquet", "-s", store, *TINY)[0] == 0
    shutil.rmtree(store / "rows" / "pixels_sha256")  # as version 0.4 laid stores out
    shutil.rmtree(store / "rows" / "finetune_seen")
    rows = FeatureStore.open(store).rows()
    assert (rows["pixels_sha256"] == "").all() and not rows["finetune_seen"].any()
    code, out = cli("extract", manifest, "-s", store, *TINY)
    assert code == 0 and "5 new rows appended" in out
    assert FeatureStore.open(store).summary()["ok"] == 10


def test_predict_help_says_a_model_folder_is_code():
    result = runner.invoke(app, ["predict", "--help"])
    assert result.exit_code == 0 and "model.joblib is a pickle" in " ".join(result.output.split())


def test_a_full_disk_when_the_lock_record_is_written_names_the_lock_file(tmp_path, monkeypatch):
    import aml_rapids.features.lock as lock_module
    from aml_rapids.errors import OutputError
    from aml_rapids.features.lock import StoreLock

    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lock_module.os, "pwrite", no_space)
    with pytest.raises(OutputError, match=r"cannot write the lock file .*s.zarr.lock: No space left on device"):
        with StoreLock(tmp_path / "s.zarr"):
            pass
    monkeypatch.undo()
    with StoreLock(tmp_path / "s.zarr"):  # the failed attempt left no lock held
        pass


def test_a_prediction_interrupted_after_its_predictions_resumes_only_for_its_own_store(trained, tmp_path):
    out = tmp_path / "pred"
    store = trained / "features.zarr"
    assert cli("predict", trained / "model", store, "-o", out)[0] == 0
    shutil.rmtree(out / "runs")  # as a kill in the drift check leaves it: predictions, no run record
    other = tmp_path / "other.zarr"
    shutil.copytree(store, other)
    code, message = cli("predict", trained / "model", other, "-o", out)
    assert code == 8 and "unfinished prediction of" in message
    code, message = cli("predict", trained / "model", store, "-o", out)
    assert code == 0 and "resuming" in message
