"""The benchmark suite runs end to end on a tiny count and writes well-formed results (no speed is asserted)."""

import gzip
import json

import pytest

from benchmarks.__main__ import main
from benchmarks.classify_bench import CUML_THREADS, stages, synthetic_features
from benchmarks.extract_bench import variant_name
from benchmarks.harness import synthetic_manifest
from benchmarks.report import latest_runs, markdown
from benchmarks.trace_extract import device_time, trace


@pytest.mark.slow
def test_the_suite_writes_well_formed_results(tmp_path):
    results = tmp_path / "results.jsonl"
    # The CPU smoke run: 512 cells through MobileNetV2 (random weights), about a minute on 2 cores.
    main(["suite", "--count", "512", "--naive-count", "256", "--repeats", "1", "--batch-size", "64", "--cache",
          str(tmp_path), "--results", str(results), "--backbones", "mobilenet_v2", "--no-warmup", "--rows", "600",
          "--pca", "8", "--train-images", "64", "--finetune-backbone", "tiny", "--engines", "openvino:bf16"])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    by_stage = {stage: [r for r in rows if r["stage"] == stage]
                for stage in ("loader", "extract", "classify", "finetune")}
    # loader: 2 naive + 3 DALI (a GPU adds the mixed decoder); extract: naive + 3 end to end (eager, compiled,
    # OpenVINO bf16), naive + eager + OpenVINO forward per backbone, 2 store writes; classify: 5 scikit-learn
    # steps (no cuML); finetune: the naive loop and aml-rapids' in fp32 and bf16
    assert [len(v) for v in by_stage.values()] == [5, 9, 5, 3] and len(rows) == 22
    assert {r["items"] for r in by_stage["finetune"]} == {64}
    assert by_stage["finetune"][0]["auto_choice"]["chosen"] in ("fp32", "bf16")
    for row in rows:
        assert row["items_per_s"] > 0 and row["machine"]["cores"] >= 1 and "torch" in row["versions"]
    assert {r["items"] for r in by_stage["loader"]} == {256, 512}  # the naive loaders read the first 256 cells
    for row in by_stage["classify"]:
        assert 0 < row["heldout_accuracy"] <= 1 and 0 < row["heldout_agreement_sklearn_seed_0_vs_1"] <= 1
    stacking = next(r for r in by_stage["classify"] if "stacking" in r["variant"])
    assert {"zscore+pca", "base learner fits", "fold outputs", "meta fit"} <= set(stacking["breakdown"])
    assert {"fold svm fit", "fold rf fit", "rf refit"} <= set(stacking["learner_seconds"])
    assert sum(stacking["breakdown"].values()) <= stacking["seconds_median"]
    assert all(r["first_batch_seconds"] > 0 for r in by_stage["loader"])
    for row in (r for r in by_stage["loader"] if r["variant"].startswith("dali")):
        parts = row["startup_seconds"]  # where the time before the first batch went
        assert set(parts) == {"file checks", "augmentation draws", "pipeline build", "first batch"}
        assert 0 < sum(parts.values()) <= row["first_batch_seconds"]
    end_to_end = [r for r in by_stage["extract"] if r["variant"].startswith("aml-rapids")]
    assert all(0 < sum(r["breakdown"].values()) <= r["loop_seconds"] <= r["seconds_median"] for r in end_to_end)
    assert all(r["loop_images_per_s"] >= r["items_per_s"] for r in end_to_end)
    forward = [r for r in by_stage["extract"] if "forward" in r["variant"]]
    assert all(0 < r["floor_fraction"] and r["floor_images_per_s"] > 0 for r in forward)
    table = markdown(latest_runs(results))
    openvino = [r for r in by_stage["extract"] if "openvino" in r["variant"]]
    assert len(openvino) == 2 and openvino[0]["engines"] == {"mobilenet_v2": "openvino bf16"}
    assert openvino[0]["engine_checks"]["mobilenet_v2"]["min_cosine"] >= 0.999  # the parity guard held
    assert openvino[1]["matmul"]["dtype"] == "bfloat16"  # its floor is bf16's
    assert table.count("\n") == 2 + 22 - 1 and "of floor" in table and "sklearn stacking fit" in table
    assert "aml-rapids loop bf16 autocast" in table


def test_the_table_keeps_each_variants_newest_run_of_each_kind(tmp_path):
    def run(time, modes, *variants):
        machine = {"cpu": "EPYC", "cores": 2}
        return [{"time_utc": time, "stage": "extract", "variant": v, "items": 8, "seconds_median": 1.0,
                 "items_per_s": 8.0, "params": {"modes": modes}, "machine": machine} for v in variants]
    rows = (run("1", ["eager", "default"], "naive", "eager", "compiled", "renamed since")
            + run("2", ["eager", "default"], "naive", "eager", "compiled")
            + run("3", ["reduce-overhead"], "naive", "graphs")
            + run("4", ["default"], "naive", "compiled"))
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shown = [(r["time_utc"], r["variant"]) for r in latest_runs(results)]
    assert shown == [("2", "eager"), ("3", "graphs"), ("4", "naive"), ("4", "compiled")]


def test_device_time_counts_overlapping_work_once():
    events = [{"name": "triton_poi_fused_0", "ts": 0.0, "dur": 10.0, "tid": 7},
              {"name": "sm90_xmma_fprop_implicit_gemm", "ts": 5.0, "dur": 10.0, "tid": 8},
              {"name": "Memcpy DtoH (Device -> Pinned)", "ts": 20.0, "dur": 5.0, "tid": 7}]
    summary = device_time(events, loop_seconds=50e-6, after_start_seconds=25e-6)
    assert summary["gpu_busy_seconds"] == pytest.approx(20e-6)  # 0-15 and 20-25
    assert summary["gpu_busy_share_of_loop"] == pytest.approx(0.4)
    assert summary["gpu_busy_share_after_start"] == pytest.approx(0.8)
    assert summary["busy_seconds_by_stream"] == pytest.approx({"7": 15e-6, "8": 10e-6})
    assert summary["busy_seconds_by_kind"] == pytest.approx({"fused (inductor, Triton)": 10e-6,
                                                             "convolution": 10e-6, "copy": 5e-6})


def test_the_extraction_trace_writes_its_files_on_a_cpu(tmp_path):
    summary = trace(64, "cpu", 32, ["mobilenet_v2"], None, tmp_path / "trace", tmp_path / "cells")
    assert summary["images"] == 64 and summary["loop_seconds"] > 0
    assert json.loads((tmp_path / "trace" / "summary.json").read_text()) == summary
    with gzip.open(tmp_path / "trace" / "trace.json.gz", "rt") as fh:
        assert any("convolution" in e.get("name", "") for e in json.load(fh)["traceEvents"])
    assert "convolution" in (tmp_path / "trace" / "ops.txt").read_text()


def test_the_threads_trial_adds_a_fit_that_predicts_as_the_default_one():
    X, y = synthetic_features(800)
    out, breakdown, _, _ = stages("sklearn", X[:600], y[:600], X[600:], y[600:], 8, [3], threads_trial=True)
    for threads in CUML_THREADS:
        trial = f"stacking fit (all, 3 folds, {threads} thread{'s' * (threads > 1)})"
        assert out[trial] > 0 and breakdown[trial]["n_jobs"] == threads
        assert breakdown[trial]["heldout_agreement_with_default_n_jobs"] == 1.0


def test_a_smaller_count_reuses_a_larger_synthetic_set(tmp_path):
    larger = synthetic_manifest(300, tmp_path)  # two patients per class: 500 cells drawn
    smaller = synthetic_manifest(100, tmp_path)
    assert len(larger.table) == 300 and len(smaller.table) == 100
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["synthetic-2x50"]
    assert smaller.table["path"].tolist() == larger.table["path"].tolist()[:100]


def test_the_extract_stage_times_the_modes_asked_for(tmp_path):
    results = tmp_path / "results.jsonl"
    main(["extract", "--count", "64", "--repeats", "2", "--batch-size", "32", "--cache", str(tmp_path),
          "--results", str(results), "--backbones", "mobilenet_v2", "--no-warmup", "--extract-modes", "eager",
          "--engines", "none"])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    ends = [r for r in rows if "Zarr, HSV" in r["variant"]]
    assert [r["variant"] for r in ends] == [variant_name("cpu", "eager")]
    assert ends[0]["params"]["modes"] == ["eager"] and ends[0]["items"] == 64
    assert ends[0]["after_first_batch_per_s"] > ends[0]["loop_images_per_s"]  # the start-up left out
    runs = ends[0]["after_first_batch_per_s_runs"]
    assert len(runs) == 2 and ends[0]["after_first_batch_per_s"] == pytest.approx(sum(runs) / 2)
    assert 0 < ends[0]["floor_fraction"] == ends[0]["items_per_s"] / ends[0]["floor_images_per_s"]
    forward = [r for r in rows if r.get("backbone") == "mobilenet_v2"]  # naive and aml-rapids, one floor
    assert len(forward) == 2 and forward[0]["floor_images_per_s"] == forward[1]["floor_images_per_s"]
    assert ends[0]["floor_images_per_s"] == pytest.approx(forward[0]["floor_images_per_s"])


def test_an_unknown_extract_mode_or_engine_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="unknown --extract-modes: eagre .choose from eager, default, reduce"):
        main(["extract", "--cache", str(tmp_path), "--extract-modes", "eager,eagre"])
    with pytest.raises(SystemExit, match="unknown --engines: openvno:bf16, torch .each ENGINE:PRECISION"):
        main(["extract", "--cache", str(tmp_path), "--engines", "openvno:bf16,torch"])
    assert not any(tmp_path.iterdir())  # no cells drawn
