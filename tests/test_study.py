"""Studies: variants expanded and checked before any work, stores shared by extraction settings, a failing
variant reported while the others go on, resume, and McNemar's test checked by hand."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from aml_rapids.cli import app
from aml_rapids.errors import AmlRapidsError, ConfigError
from aml_rapids.study.compare import mcnemar_test
from aml_rapids.study.spec import read_spec, variant_config

from conftest import REPO

runner = CliRunner()
TINY = {"features.backbones": [{"name": "tiny", "weights": "none"}], "loader.image_size": 32,
        "loader.batch_size": 8, "features.chunk_batches": 1, "loader.device": "cpu", "classify.folds": 2,
        "evaluate.bootstrap_samples": 50}


def _spec(tmp_path, **fields) -> object:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "s", **fields}))
    return path


def test_patterns_expand_in_order_and_every_variant_is_checked(tmp_path):
    spec = read_spec(_spec(tmp_path, reference="b", variants=[{"name": "a"}],
                           grid={"classify.svm_c": [1, 10]},
                           cumulative=[{"name": "b", "set": {"augment.enabled": False}},
                                       {"name": "c", "set": {"oversample.enabled": False}}],
                           leave_one_out={"of": "c", "parts": {"aug": {"augment.enabled": True}}}))
    assert [(v.name, v.set) for v in spec.expand()] == [
        ("a", {}), ("classify.svm_c=1", {"classify.svm_c": 1}), ("classify.svm_c=10", {"classify.svm_c": 10}),
        ("b", {"augment.enabled": False}), ("c", {"augment.enabled": False, "oversample.enabled": False}),
        ("c - aug", {"augment.enabled": True, "oversample.enabled": False})]
    assert variant_config(spec, spec.expand()[-1]).augment.enabled is True
    for name in ("paper-comparison", "paper-ablation", "pbc-ablation", "deepapl-ablation"):
        shipped = read_spec(REPO / "configs" / "studies" / f"{name}.yaml")
        assert all(variant_config(shipped, v) for v in shipped.expand())


@pytest.mark.parametrize("fields, message", [
    ({"reference": "a", "variants": [{"name": "a"}, {"name": "a"}]}, "given twice: a"),
    ({"reference": "z", "variants": [{"name": "a"}]}, "reference 'z' is not a variant"),
    ({"reference": "a", "variants": [{"name": "a", "sett": {}}]}, "sett"),
])
def test_a_bad_study_file_is_refused_naming_the_problem(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        read_spec(_spec(tmp_path, **fields))


def test_a_misspelt_key_or_a_variant_that_splits_otherwise_is_refused(tmp_path):
    spec = read_spec(_spec(tmp_path, reference="a", variants=[{"name": "a", "set": {"segmentation.nope": 1}},
                                                              {"name": "b", "set": {"split.seed": 2}}]))
    with pytest.raises(ConfigError, match="variant 'a'.*segmentation.nope"):
        variant_config(spec, spec.expand()[0])
    with pytest.raises(ConfigError, match="variant 'b' overrides split.seed.*same cells"):
        variant_config(spec, spec.expand()[1])


def test_mcnemar_on_the_papers_counts():
    """b = 383, c = 286 discordant cells of 12,184: chi-square 14.06 without continuity correction."""
    both, neither = 10_000, 12_184 - 10_000 - 383 - 286
    reference = np.array([True] * both + [True] * 383 + [False] * 286 + [False] * neither)
    other = np.array([True] * both + [False] * 383 + [True] * 286 + [False] * neither)
    test = mcnemar_test(reference, other)
    assert (test["b"], test["c"], test["n"]) == (383, 286, 12_184)
    assert test["chi2"] == pytest.approx(14.06, abs=0.005) and test["test"].startswith("chi-square")
    assert test["p"] == test["chi2_p"] == pytest.approx(1.77e-4, rel=0.01)
    few = mcnemar_test(np.array([True] * 8 + [False] * 2), np.array([False] * 8 + [True] * 2))
    assert few["test"] == "exact binomial" and few["p"] == few["exact_p"] == pytest.approx(0.109375)


@pytest.mark.slow
def test_a_study_shares_stores_goes_on_past_a_failure_and_resumes(tmp_path):
    runner.invoke(app, ["demo-data", "-o", str(tmp_path / "demo"), "--patients", "4", "--cells", "6"])
    spec = _spec(tmp_path, set=TINY, reference="tiny", variants=[
        {"name": "tiny"}, {"name": "tiny C=10", "set": {"classify.svm_c": 10.0}},
        {"name": "tiny, no segmentation", "set": {"segmentation.enabled": False}},
        {"name": "missing weights", "set": {"features.backbones": [{"name": "tiny", "weights": "/nowhere.pt"}]}}])
    out = tmp_path / "study"
    first = runner.invoke(app, ["study", str(spec), str(tmp_path / "demo"), "-o", str(out), "--json"])
    assert first.exit_code == 9, first.output
    summary = json.loads(first.stdout)
    assert "missing weights" in summary["error"] and "/nowhere.pt" in summary["error"]
    assert len(list((out / "stores").glob("*/features.zarr"))) == 2  # the C=10 variant reused the first store
    table = pd.read_csv(out / "results.csv")
    assert list(table["variant"]) == ["tiny", "tiny C=10", "tiny, no segmentation"]
    tests = pd.read_csv(out / "mcnemar.csv")
    assert list(tests["level"]) == ["cells", "cells", "patients", "patients"]
    cells = {name: pd.read_csv(next((out / "variants").glob(f"{slug}-*")) / "model" / "eval-test" / "predictions.csv")
             .set_index("cell_id").sort_index() for name, slug in (("tiny", "tiny"), ("tiny, no segmentation",
                                                                                     "tiny_no_segmentation"))}
    right = {name: (c["predicted"] == c["label"]).to_numpy() for name, c in cells.items()}
    row = tests[(tests["level"] == "cells") & (tests["variant"] == "tiny, no segmentation")].iloc[0]
    assert row["b"] == (right["tiny"] & ~right["tiny, no segmentation"]).sum()
    assert row["c"] == (~right["tiny"] & right["tiny, no segmentation"]).sum()
    assert (out / "roc.png").is_file() and (out / "roc.svg").is_file() and "McNemar" in (out / "results.md").read_text()
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 + 3 * 3  # the study's ROC, each variant's three plots
    assert "McNemar" in page and "tiny, no segmentation" in page and "exact binomial" in page
    again = runner.invoke(app, ["study", str(spec), "-o", str(out)])
    assert again.exit_code == 9 and again.output.count("done earlier, kept") == 3
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"name": "t", "reference": "a", "variants": [{"name": "a", "set": TINY}]}))
    refused = runner.invoke(app, ["study", str(other), "-o", str(out)])
    assert refused.exit_code == 2 and "holds study 's', not 't'" in " ".join(refused.output.split())


@pytest.mark.slow
def test_a_fine_tuned_head_is_a_variant_compared_on_the_same_test_cells(tmp_path):
    runner.invoke(app, ["demo-data", "-o", str(tmp_path / "demo"), "--patients", "4", "--cells", "6"])
    tuned = {"finetune.backbone": "tiny", "finetune.weights": "none", "finetune.max_steps": 2,
             "finetune.batch_size": 8, "finetune.val_every": 2}
    spec = _spec(tmp_path, set=TINY, reference="tiny", variants=[{"name": "tiny"},
                                                                {"name": "tiny head", "head": True, "set": tuned}])
    out = tmp_path / "study"
    result = runner.invoke(app, ["study", str(spec), str(tmp_path / "demo"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    head = next((out / "variants").glob("tiny_head-*"))
    assert (head / "finetune" / "best.pt").is_file() and not (head / "model").exists()
    assert json.loads((head / "variant.json").read_text())["store"] is None
    assert len(list((out / "stores").glob("*/features.zarr"))) == 1  # the head extracts nothing
    cells = {name: pd.read_csv(folder).set_index("cell_id").sort_index() for name, folder in (
        ("tiny", next((out / "variants").glob("tiny-*")) / "model" / "eval-test" / "predictions.csv"),
        ("tiny head", head / "finetune" / "eval-test" / "predictions.csv"))}
    assert list(cells["tiny"].index) == list(cells["tiny head"].index)  # the same test cells
    right = {name: (c["predicted"] == c["label"]).to_numpy() for name, c in cells.items()}
    row = pd.read_csv(out / "mcnemar.csv").query("level == 'cells'").iloc[0]
    assert row["variant"] == "tiny head" and row["b"] == (right["tiny"] & ~right["tiny head"]).sum()
    assert row["c"] == (~right["tiny"] & right["tiny head"]).sum()
    assert list(pd.read_csv(out / "results.csv")["variant"]) == ["tiny", "tiny head"]
    kfold = _spec(tmp_path, set={**TINY, "split.method": "kfold"}, reference="tiny",
                  variants=[{"name": "tiny"}, {"name": "tiny head", "head": True, "set": tuned}])
    refused = runner.invoke(app, ["study", str(kfold), str(tmp_path / "demo"), "-o", str(tmp_path / "k")])
    assert refused.exit_code == 2 and "a k-fold study has none" in " ".join(refused.output.split())


@pytest.mark.slow
def test_a_kfold_study_compares_pooled_out_of_fold_predictions(tmp_path):
    runner.invoke(app, ["demo-data", "-o", str(tmp_path / "demo"), "--patients", "4", "--cells", "4"])
    spec = _spec(tmp_path, set={**TINY, "split.method": "kfold", "split.folds": 4}, reference="a",
                 variants=[{"name": "a"}, {"name": "b", "set": {"classify.svm_c": 10.0}}])
    result = runner.invoke(app, ["study", str(spec), str(tmp_path / "demo"), "-o", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    tests = pd.read_csv(tmp_path / "s" / "mcnemar.csv")
    assert list(tests["level"]) == ["cells", "patients"] and list(tests["n"]) == [80, 20]  # every cell, once
    assert "patient-grouped k-fold, out-of-fold" in (tmp_path / "s" / "results.md").read_text()


@pytest.mark.slow
def test_a_comparison_is_never_left_from_an_earlier_run(tmp_path):
    runner.invoke(app, ["demo-data", "-o", str(tmp_path / "demo"), "--patients", "4", "--cells", "3"])
    spec = _spec(tmp_path, set=TINY, reference="a", variants=[
        {"name": "a"}, {"name": "broken", "set": {"features.backbones": [{"name": "tiny", "weights": "/nowhere.pt"}]}}])
    out = tmp_path / "s"
    assert runner.invoke(app, ["study", str(spec), str(tmp_path / "demo"), "-o", str(out)]).exit_code == 9
    for name in ("results.csv", "roc.png"):  # as a run whose other variants had results would have left them
        (out / name).write_text("earlier")
    again = runner.invoke(app, ["study", str(spec), "-o", str(out)])
    assert again.exit_code == 9 and not (out / "results.csv").exists() and not (out / "roc.png").exists()
    assert "earlier comparison (results.csv, roc.png) was removed" in " ".join(again.output.split())
    accepted = runner.invoke(app, ["study", str(spec), "-o", str(out), "--allow-failed"])
    assert accepted.exit_code == 0 and "1 of 2 variants failed (broken:" in " ".join(accepted.output.split())


def test_a_study_folder_is_claimed_before_any_work_and_its_base_is_kept(tmp_path):
    from aml_rapids.study.runner import run_study

    runner.invoke(app, ["demo-data", "-o", str(tmp_path / "demo"), "--patients", "4", "--cells", "2"])
    spec = _spec(tmp_path, set={**TINY, "split.folds": 50, "split.method": "kfold"}, reference="a",
                 variants=[{"name": "a"}])
    with pytest.raises(AmlRapidsError, match="50"):  # the split fails after indexing
        run_study(spec, tmp_path / "s", tmp_path / "demo")
    with pytest.raises(ConfigError, match="other base settings"):  # a changed base is refused, not mixed in
        run_study(spec, tmp_path / "s", tmp_path / "demo", ["classify.svm_c=3"])
    study = json.loads((tmp_path / "s" / "study.json").read_text())
    assert study["data"] == str((tmp_path / "demo").resolve()) and study["base"]
