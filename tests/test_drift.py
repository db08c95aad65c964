"""Drift between cohorts: a domain classifier that does not flag two draws of one cohort and flags a shifted one,
refusals of stores made otherwise, the colour of segmented cells, and the check inside predict."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from aml_rapids.cli import app
from aml_rapids.config import DriftConfig, SegmentationConfig
from aml_rapids.cohorts.colour import measure_files
from aml_rapids.cohorts.drift import comparable_backbones, measure_drift
from aml_rapids.data.manifest import read_manifest
from aml_rapids.data.synthetic import write_demo_dataset
from aml_rapids.errors import DataError
from aml_rapids.features.plan import ROW_FIELDS, STATUS_FAILED, STATUS_OK, pad_segments
from aml_rapids.features.store import FeatureStore, StoreMismatch

runner = CliRunner()
DIM = 24
FAST = DriftConfig(permutations=100)


def feature_store(path, features: dict[str, np.ndarray], patients: np.ndarray, cohort: str, image_size: int = 32,
                  chunk_rows: int = 64) -> FeatureStore:
    """A store written directly (no images): the given features of every backbone, one cohort, test split."""
    n = len(patients)
    table = pd.DataFrame({"cell_id": [f"{cohort}-{i}" for i in range(n)], "path": "", "label": "x",
                          "patient": patients, "cohort": cohort, "split": "test",
                          "sha256": [f"{cohort}-{i}" for i in range(n)], "pixels_sha256": "", "aug_index": 0,
                          "fold": -1, "augment": False, "status": STATUS_OK, "finetune_seen": False})
    rows = pad_segments(table[list(ROW_FIELDS)], chunk_rows)
    nets = {name: {"dim": x.shape[1], "sha256": "none", "pretrained": False, "weights": "none"}
            for name, x in features.items()}
    meta = {"backbones": nets, "chunk_rows": chunk_rows, "store_dtype": "float32", "features_seed": 0,
            "preprocess": {"image_size": image_size, "segmentation": SegmentationConfig().model_dump()}}
    store = FeatureStore.create(path, rows, {name: x.shape[1] for name, x in features.items()}, meta)
    ok = (rows["status"] == STATUS_OK).to_numpy()
    for name, x in features.items():
        padded = np.full((len(rows), x.shape[1]), np.nan, dtype=np.float32)
        padded[ok] = x
        for k in range(store.n_chunks):
            store.group[f"features/{name}"][store.chunk_slice(k)] = padded[store.chunk_slice(k)]
    for k in range(store.n_chunks):
        store.write_chunk(k, {}, rows["status"].to_numpy()[store.chunk_slice(k)])
    return FeatureStore.open(path)


def cohort(rng, patients: int = 12, cells: int = 25, shift: float = 0.0, patient_spread: float = 0.0):
    """Features of a cohort: per patient an offset (``patient_spread``), per cell noise around it; ``shift`` moves
    half the dimensions up and half down (a row z-score keeps it)."""
    offsets = rng.normal(0, patient_spread, (patients, DIM))
    names = np.repeat([f"p{i}" for i in range(patients)], cells)
    x = np.repeat(offsets, cells, axis=0) + rng.normal(0, 1, (patients * cells, DIM))
    x[:, : DIM // 2] += shift
    x[:, DIM // 2:] -= shift
    return x.astype(np.float32), names


def two_stores(tmp_path, shift=0.0):
    """A reference cohort and a new one, the new one's features shifted by ``shift``; no patient effects."""
    rng = np.random.default_rng(0)
    (a, pa), (b, pb) = cohort(rng), cohort(rng, shift=shift)
    return (feature_store(tmp_path / "a.zarr", {"net": a}, pa, "hospital_a"),
            feature_store(tmp_path / "b.zarr", {"net": b}, pb, "hospital_b"))


def test_two_draws_of_one_cohort_are_not_flagged(tmp_path):
    reference, new = two_stores(tmp_path)
    drift = measure_drift(reference, new, FAST, comparable_backbones(reference, new))
    result = drift.backbones["net"]
    assert abs(result.auroc - 0.5) < 0.1 and not drift.flagged
    assert result.mmd_p > 0.05 and result.cells == {"reference": 300, "new": 300} and result.folds == 5
    assert drift.new["cohorts"] == ["hospital_b"] and drift.threshold == 0.75


def test_a_shifted_cohort_is_flagged(tmp_path):
    reference, new = two_stores(tmp_path, shift=0.5)
    drift = measure_drift(reference, new, FAST, ["net"])
    result = drift.backbones["net"]
    assert result.auroc > 0.9 and drift.flagged and drift.worst == ("net", result.auroc)
    assert result.mmd_p == 1 / (FAST.permutations + 1)  # no permutation comes near the observed split


def test_patients_unlike_each_other_are_no_drift_when_folds_keep_them_whole(tmp_path):
    """Each patient's cells share an offset, and both cohorts draw their patients alike: the MMD test, which takes
    cells for independent draws, calls the cohorts different; the patient-grouped AUROC does not flag them. The
    same cells without their patients (each cell its own group) are flagged: the classifier then knows each
    held-out cell's patient from its other cells."""
    rng = np.random.default_rng(0)
    (a, pa), (b, pb) = (cohort(rng, patients=30, cells=15, patient_spread=2.0) for _ in range(2))
    stores = [feature_store(tmp_path / f"{name}.zarr", {"net": x}, patients, name)
              for name, x, patients in (("a", a, pa), ("b", b, pb))]
    drift = measure_drift(*stores, FAST, ["net"])
    result = drift.backbones["net"]
    assert result.mmd_p < 0.01 and abs(result.auroc - 0.5) < 0.1 and not drift.flagged
    anonymous = [feature_store(tmp_path / f"{name}-anonymous.zarr", {"net": x}, np.full(len(x), ""), name)
                 for name, x in (("a", a), ("b", b))]
    assert measure_drift(*anonymous, FAST, ["net"]).flagged


def test_one_patient_is_folded_by_cell_and_few_patients_mean_fewer_folds_each_said_in_a_note(tmp_path):
    rng = np.random.default_rng(1)
    a, pa = cohort(rng)
    b, _ = cohort(rng, patients=1, cells=40)
    reference = feature_store(tmp_path / "a.zarr", {"net": a}, pa, "a")
    one = feature_store(tmp_path / "b.zarr", {"net": b}, np.full(40, "solo"), "b")
    drift = measure_drift(reference, one, FAST, ["net"])
    assert any("single patient" in note for note in drift.notes) and drift.backbones["net"].folds == 5
    three = feature_store(tmp_path / "c.zarr", {"net": b}, np.repeat(["x", "y", "z"], [14, 13, 13]), "c")
    drift = measure_drift(reference, three, FAST, ["net"])
    assert drift.backbones["net"].folds == 3 and any("3 folds, not drift.folds 5" in n for n in drift.notes)


def test_stores_made_otherwise_are_refused_naming_the_difference(tmp_path):
    rng = np.random.default_rng(2)
    x, patients = cohort(rng)
    reference = feature_store(tmp_path / "a.zarr", {"net": x, "other": x}, patients, "a")
    lacking = feature_store(tmp_path / "b.zarr", {"net": x}, patients, "b")
    with pytest.raises(StoreMismatch, match=r"b\.zarr lacks other"):
        comparable_backbones(reference, lacking)
    with pytest.raises(StoreMismatch, match=r"a\.zarr lacks third"):
        comparable_backbones(feature_store(tmp_path / "c.zarr", {"net": x, "other": x, "third": x}, patients, "c"),
                             reference)
    assert comparable_backbones(reference, lacking, ["net"]) == ["net"]  # the model's backbones, when they are held
    resized = feature_store(tmp_path / "d.zarr", {"net": x, "other": x}, patients, "d", image_size=64)
    with pytest.raises(StoreMismatch, match=r"differ in image_size"):
        comparable_backbones(reference, resized)
    feature_store(tmp_path / "e.zarr", {"net": x[:2], "other": x[:2]}, patients[:2], "e")
    failed = FeatureStore.open(tmp_path / "e.zarr", mode="r+")
    failed.group["rows/status"][:] = np.full(failed.n_rows, STATUS_FAILED, dtype=np.int8)
    with pytest.raises(DataError, match=r"e\.zarr has no usable rows"):
        measure_drift(reference, FeatureStore.open(tmp_path / "e.zarr"), FAST, ["net"])


def test_the_drift_command_writes_its_report_and_refuses_with_exit_codes(tmp_path):
    reference, new = two_stores(tmp_path, shift=0.5)
    result = runner.invoke(app, ["drift", str(reference.path), str(new.path), "--set", "drift.permutations=50"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "drift" / "drift.json").read_text())
    assert report["flagged"] is True and report["worst"]["backbone"] == "net" and report["threshold"] == 0.75
    assert report["backbones"]["net"]["auroc"] > 0.9 and report["settings"]["permutations"] == 50
    assert report["reference"]["store"] == str(reference.path) and report["new"]["cohorts"] == ["hospital_b"]
    assert report["colour"]["new"]["missing"] == 300 and report["colour"]["difference"] == {}  # no images here
    assert "DRIFT FLAGGED" in result.output and (tmp_path / "drift" / "drift.png").is_file()
    other = feature_store(tmp_path / "c.zarr", {"net": new.features("net")[:300]}, np.repeat("p", 300), "c",
                          image_size=64)
    refused = runner.invoke(app, ["drift", str(reference.path), str(other.path), "-o", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "image_size" in refused.output and not (tmp_path / "refused").exists()
    missing = runner.invoke(app, ["drift", str(reference.path), str(tmp_path / "nowhere.zarr")])
    assert missing.exit_code == 3 and "nowhere.zarr does not exist" in missing.output
    assert runner.invoke(app, ["drift", "--help"]).exit_code == 0


def cell_image(path, rgb, size: int = 24):
    """A cell of colour ``rgb`` in the middle of a beige background the HSV mask leaves out."""
    pixels = np.full((size, size, 3), (240, 218, 208), dtype=np.uint8)
    pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = rgb
    noise = np.random.default_rng(zlib.crc32(str(path).encode())).integers(-4, 5, pixels.shape)
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(path)
    return path


def test_a_redder_darker_stain_shows_in_the_foreground_colour(tmp_path):
    purple, redder = (120, 60, 200), (150, 60, 200)
    plain = [cell_image(tmp_path / f"a{i}.png", purple) for i in range(6)]
    tinted = [cell_image(tmp_path / f"b{i}.png", tuple(int(0.6 * v) for v in redder)) for i in range(6)]
    seg = SegmentationConfig()
    reference, new = measure_files(plain, seg), measure_files([*tinted, tmp_path / "gone.png"], seg)
    assert reference.measured == 6 and (new.measured, new.missing, new.chosen) == (6, 1, 7)
    assert abs(reference.mean["hue_deg"] - 265.7) < 2  # the purple's hue: the beige background is masked out
    assert new.mean["hue_deg"] - reference.mean["hue_deg"] > 5  # redder
    assert new.mean["value"] < reference.mean["value"] - 0.25  # darker: 0.6 of 200/255
    assert abs(new.mean["saturation"] - reference.mean["saturation"]) < 0.05  # scaling keeps saturation


@pytest.mark.slow
def test_predict_checks_drift_against_the_training_store(tmp_path):
    demo, run = tmp_path / "demo", tmp_path / "run"
    write_demo_dataset(demo, patients_per_class=2, cells_per_patient=10)
    tiny = ["--set", "features.backbones=[{name: tiny, weights: none, engine: torch, precision: fp32}]",
            "--set", "loader.batch_size=8", "--set", "loader.image_size=32", "--set", "loader.device=cpu",
            "--set", "features.store_dtype=float32"]
    assert runner.invoke(app, ["index", str(demo), "-o", str(run)]).exit_code == 0
    assert runner.invoke(app, ["split", str(run / "manifest.parquet"), "--method", "image"]).exit_code == 0
    assert runner.invoke(app, ["extract", str(run / "manifest.parquet"), *tiny]).exit_code == 0
    small = ["--set", "classify.pca_components=4", "--set", "classify.rf_trees=10", "--set", "classify.folds=2"]
    trained = runner.invoke(app, ["train", str(run / "features.zarr"), "-o", str(run / "model"), "--backend",
                                  "sklearn", *small])
    assert trained.exit_code == 0, trained.output
    write_demo_dataset(tmp_path / "new", patients_per_class=1, cells_per_patient=4, seed=9)
    predicted = runner.invoke(app, ["predict", str(run / "model"), str(tmp_path / "new"), "-o", str(tmp_path / "p")])
    assert predicted.exit_code == 0, predicted.output
    report = json.loads((tmp_path / "p" / "drift.json").read_text())
    held_out = int((read_manifest(run / "manifest.parquet").table["split"] != "train").sum())
    # the reference: the training cohort's un-augmented cells (its val and test parts), not the warped train rows
    assert report["reference"]["cells"] == held_out and "train" not in report["reference"]["splits"]
    assert report["new"]["cells"] == 20 and "tiny" in report["backbones"]
    assert report["colour"]["reference"]["measured"] == held_out and report["colour"]["new"]["measured"] == 20
    assert set(report["colour"]["difference"]) == {"hue_deg", "saturation", "value", "haematoxylin_od", "eosin_od",
                                                   "dab_od"}
    mix = report["class_mix"]
    assert abs(sum(mix["new"].values()) - 1) < 1e-9 and mix["cells"] == {"reference": held_out, "new": 20}
    assert f"did not train on ({held_out} of 100)" in mix["reference_cells"]
    assert "domain AUROC against the model's training store" in " ".join(predicted.output.split())
    assert (tmp_path / "p" / "drift.png").is_file()
    store = tmp_path / "p" / "features.zarr"
    skipped = runner.invoke(app, ["predict", str(run / "model"), str(store), "-o", str(tmp_path / "q"), "--no-drift"])
    assert skipped.exit_code == 0 and not (tmp_path / "q" / "drift.json").exists()
    (run / "features.zarr").rename(run / "moved.zarr")
    gone = runner.invoke(app, ["predict", str(run / "model"), str(store), "-o", str(tmp_path / "r")])
    assert gone.exit_code == 0 and "no drift check: the model's training store" in " ".join(gone.output.split())
    by_hand = runner.invoke(app, ["drift", str(run / "moved.zarr"), str(store), "--model", str(run / "model"),
                                  "-o", str(tmp_path / "d")])
    assert by_hand.exit_code == 0, by_hand.output
    assert json.loads((tmp_path / "d" / "drift.json").read_text())["class_mix"]["cells"]["new"] == 20


def test_cells_on_both_sides_leave_the_reference_and_a_store_against_itself_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    (a, pa) = cohort(rng)
    reference = feature_store(tmp_path / "a.zarr", {"net": a}, pa, "hospital_a")
    overlap = feature_store(tmp_path / "o.zarr", {"net": a[:100]}, pa[:100], "hospital_a")  # the same 100 cells
    drift = measure_drift(reference, overlap, FAST, ["net"])
    assert drift.backbones["net"].cells == {"reference": 200, "new": 100}
    assert any("100 cells of the reference are also in the new store" in note for note in drift.notes)
    assert abs(drift.backbones["net"].auroc - 0.5) < 0.15 and not drift.flagged
    with pytest.raises(DataError, match="also in .*no reference is left"):
        measure_drift(reference, reference, FAST, ["net"])


def test_a_handful_of_cells_gets_no_verdict_either_way(tmp_path):
    rng = np.random.default_rng(4)
    (a, pa), (b, pb) = cohort(rng), cohort(rng, patients=2, cells=5, shift=3.0)
    reference = feature_store(tmp_path / "a.zarr", {"net": a}, pa, "hospital_a")
    few = feature_store(tmp_path / "b.zarr", {"net": b}, pb, "hospital_b")
    drift = measure_drift(reference, few, FAST, ["net"])
    assert not drift.judged and not drift.flagged and drift.notes[0].startswith("no verdict: 10 cells on one side")
