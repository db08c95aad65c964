"""Two cohorts through the commands: a cohort-level split named in every report, results per cohort side by side
after retraining on both, a deployment model trained on everything, stain normalisation carried into predict."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from aml_rapids.cli import app

from conftest import write_image

runner = CliRunner()
TINY = ["--set", "features.backbones=[{name: tiny, weights: none, engine: torch, precision: fp32}]",
        "--set", "loader.batch_size=8", "--set", "loader.image_size=32", "--set", "classify.pca_components=4",
        "--set", "classify.folds=2", "--set", "classify.rf_trees=10", "--set", "evaluate.bootstrap_samples=20"]


def two_sites(root: Path) -> Path:
    """A CSV of two cohorts, siteB's smear tinted: 2 classes x 4 patients x 4 cells each."""
    rng = np.random.default_rng(0)
    rows = []
    for site, tint in (("siteA", (0, 0, 0)), ("siteB", (25, -15, 10))):
        for label, cell in (("blast", (110, 60, 170)), ("lymph", (70, 40, 120))):
            for p in range(4):
                for i in range(4):
                    img = np.full((32, 32, 3), (230, 210, 200), np.int32) + tint
                    size = 8 + 2 * (label == "blast") + rng.integers(0, 3)
                    img[16 - size:16 + size, 16 - size:16 + size] = np.array(cell) + tint + rng.integers(0, 20, 3)
                    path = root / site / label / f"p{p}" / f"c{i}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
                    rows.append({"path": str(path), "label": label, "patient": f"{label}{p}", "cohort": site})
    csv = root / "cells.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_cohort_split_trains_on_one_site_and_names_it_in_the_report(tmp_path):
    csv = two_sites(tmp_path / "data")
    out = tmp_path / "run"
    invoke("index", csv, "-o", out, "-q")
    invoke("split", out / "manifest.parquet", "--method", "cohort", "--test-cohort", "siteB", "--set", "split.val=0.25")
    invoke("extract", out / "manifest.parquet", "-o", out / "features.zarr", *TINY)
    invoke("train", out / "features.zarr", "-o", out / "model", *TINY)
    result = invoke("evaluate", out / "model", out / "features.zarr", *TINY)
    metrics = json.loads((out / "model" / "eval-test" / "metrics.json").read_text())
    assert metrics["split_protocol"] == ("cohort-level: trained on siteA, tested on siteB (val held out of the "
                                         "training cohorts, grouped by patient)")
    assert "cohort-level: trained on siteA, tested on siteB" in result.output
    assert "by_cohort" not in metrics  # one cohort tested
    assert "patient_level" in metrics  # labels belong to patients here
    missing = runner.invoke(app, ["split", str(out / "manifest.parquet"), "--method", "cohort", "--test-cohort", "siteX"])
    assert missing.exit_code == 4 and "no cohort 'siteX'" in missing.output


def test_retraining_on_both_sites_reports_each_side_by_side_and_all_trains_on_everything(tmp_path):
    csv = two_sites(tmp_path / "data")
    out = tmp_path / "run"
    invoke("index", csv, "-o", out, "-q")
    invoke("split", out / "manifest.parquet", "--method", "image", "--seed", "1")
    invoke("extract", out / "manifest.parquet", "-o", out / "features.zarr", *TINY)
    invoke("train", out / "features.zarr", "-o", out / "model", *TINY)
    result = invoke("evaluate", out / "model", out / "features.zarr", *TINY)
    metrics = json.loads((out / "model" / "eval-test" / "metrics.json").read_text())
    assert set(metrics["by_cohort"]) == {"siteA", "siteB"}
    assert sum(level["n"] for level in metrics["by_cohort"].values()) == metrics["cell_level"]["n"]
    assert "cells of siteA" in result.output and "cells of siteB" in result.output
    invoke("report", out)
    assert "Cells of siteB (n = " in (out / "report.html").read_text()
    deploy = tmp_path / "deploy"
    run = invoke("run", csv, "-o", deploy, "--set", "split.method=all", *TINY)
    assert "nothing is left to evaluate" in run.output and (deploy / "model" / "model.json").is_file()
    info = json.loads((deploy / "model" / "model.json").read_text())
    assert info["training_rows"] == 64 and info["split_protocol"] == "every row in training, nothing held out"
    refused = runner.invoke(app, ["evaluate", str(deploy / "model"), str(deploy / "features.zarr")])
    assert refused.exit_code == 2 and "has no split test" in refused.output
    assert not (deploy / "model" / "eval-test").exists()  # refused before its folder was made


def test_a_normalised_model_predicts_with_the_same_target_and_refuses_another(tmp_path):
    csv = two_sites(tmp_path / "data")
    ref = write_image(tmp_path / "ref.png", 32, (120, 50, 170))
    norm = ["--set", "stain_norm.method=reinhard", "--set", f"stain_norm.reference={ref}"]
    out = tmp_path / "run"
    invoke("run", csv, "-o", out, "--set", "split.method=cohort", "--set", "split.test_cohorts=[siteB]",
           "--set", "split.val=0.25", *TINY, *norm)
    predicted = invoke("predict", out / "model", tmp_path / "data" / "siteB", "-o", out / "pred")
    assert (out / "pred" / "predictions.csv").is_file() and (out / "pred" / "drift.json").is_file(), predicted.output
    invoke("report", out)
    page = (out / "report.html").read_text()
    assert "drift of siteB against siteA:" in page and "domain AUROC" in page  # the training cohort alone
    other = write_image(tmp_path / "other.png", 32, (90, 30, 200))
    refused = runner.invoke(app, ["predict", str(out / "model"), str(tmp_path / "data" / "siteB"), "-o",
                                  str(tmp_path / "pred2"), "--no-drift", "--set", f"stain_norm.reference={other}"])
    assert refused.exit_code == 2 and "stain_norm" in refused.output


def test_patient_level_comparisons_only_where_labels_belong_to_patients():
    from aml_rapids.study.compare import VariantResult, mcnemar_table

    def variant(name, labels, patients):
        cells = pd.DataFrame({"cell_id": [f"c{i}" for i in range(8)], "cohort": "a", "patient": patients,
                              "label": labels, "predicted": "x", "p_x": 0.6, "p_y": 0.4})
        return VariantResult(name, {}, cells)

    diagnosis = (["x"] * 4 + ["y"] * 4, ["p1"] * 4 + ["p2"] * 4)
    cell_types = (["x", "y"] * 4, ["p1"] * 4 + ["p2"] * 4)  # each patient has cells of both types
    for (labels, patients), levels in ((diagnosis, {"cells", "patients"}), (cell_types, {"cells"})):
        table = mcnemar_table([variant("ref", labels, patients), variant("other", labels, patients)], "ref")
        assert set(table["level"]) == levels


def test_a_store_of_two_manifests_split_apart_names_both_protocols():
    from aml_rapids.classify.train import stores_protocol

    one = [{"split": {"method": "patient"}, "cohorts": ["a"]}]
    assert stores_protocol(one) == "patient-grouped split"
    assert stores_protocol(one + [{"split": {"method": "patient"}, "cohorts": ["b"]}]) == "patient-grouped split"
    assert stores_protocol([{"split": {"method": "image"}, "cohorts": ["pbc"]}, *one]) == (
        "image-level split (pbc) + patient-grouped split (a)")


def test_blank_cohorts_in_a_csv_are_named_in_a_warning(tmp_path):
    from aml_rapids.config import IndexConfig
    from aml_rapids.data.manifest import build_manifest

    rows = [{"path": str(write_image(tmp_path / f"c{i}.png", 16, (100 + i, 50, 160))), "label": "x",
             "cohort": "siteA" if i < 2 else ""} for i in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "cells.csv", index=False)
    result = build_manifest(tmp_path / "cells.csv", IndexConfig())
    assert any("1 rows have no cohort" in w and repr(tmp_path.name) in w for w in result.warnings)


def test_cell_type_labels_are_resampled_by_patient_without_strata_and_get_no_patient_result(tmp_path):
    from aml_rapids.config import EvaluateConfig
    from aml_rapids.evaluate.report import write_report

    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"cell_id": [f"c{i}" for i in range(60)], "path": "", "cohort": "a",
                         "patient": [f"p{i % 6}" for i in range(60)], "label": rng.choice(["x", "y"], 60)})
    proba = rng.dirichlet([1, 1], 60)
    info = {"split_protocol": "patient-grouped split", "backbones": {}, "backend": "sklearn", "source": {}}
    report = write_report(rows, proba, np.array(["x", "y"]), info, "test", tmp_path, EvaluateConfig(bootstrap_samples=20))
    assert report["bootstrap"]["resampled"] == "patients, unstratified (a patient holds cells of several classes)"
    assert "patient_level" not in report and any("no patient-level result" in w for w in report["warnings"])


@pytest.mark.realdata
def test_the_cross_site_cells_are_pbc_and_the_deepapl_types_that_map_to_it(shared_data, tmp_path):
    from benchmarks.cross_site import PBC_TYPE, cells_csv

    cells = pd.read_csv(cells_csv(shared_data.parent, tmp_path), keep_default_na=False)
    counts = cells["cohort"].value_counts().to_dict()
    assert counts == {"pbc144": 17092, "deepapl144": 6680}
    deepapl = cells[cells["cohort"] == "deepapl144"]
    assert set(deepapl["label"]) == set(cells.loc[cells["cohort"] == "pbc144", "label"]) == set(PBC_TYPE.values())
    assert (deepapl["label"] == deepapl["cell_type"].map(PBC_TYPE)).all() and (deepapl["patient"] != "").all()
