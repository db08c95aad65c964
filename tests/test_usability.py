"""What a researcher meets first: help that shows defaults, the version, the backbone list, progress in a batch
job's log, -q/-v, --json, a log file and run records that keep history, and what evaluate writes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pandas as pd
import pytest
import typer
from typer.core import TyperArgument, TyperOption
from typer.testing import CliRunner

from aml_rapids import __version__
from aml_rapids.cli import app
from aml_rapids.provenance import run_records

runner = CliRunner()
TINY = ["--set", "features.backbones=[{name: tiny, weights: none, engine: torch, precision: fp32}]", "--set", "loader.batch_size=8",
        "--set", "features.chunk_batches=1", "--set", "loader.image_size=32", "--set", "loader.device=cpu"]


def _commands(group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command's words (``weights fetch`` for a command of a group)."""
    return [leaf for name, command in sorted(group.commands.items())
            for leaf in (_commands(command, (*path, name)) if hasattr(command, "commands") else [(*path, name)])]


COMMANDS = [" ".join(words) for words in _commands(typer.main.get_command(app))]


def _option_blocks(help_text: str) -> dict[str, str]:
    """Each option's part of a --help page (its line and the wrapped lines below it), by long name."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        match = re.match(r"\s{2}(?:-\w, )*(--[\w-]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = ""
        if current:
            blocks[current] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_of_every_command_shows_its_default(name):
    result = runner.invoke(app, [*name.split(), "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    blocks = _option_blocks(result.output)
    command = typer.main.get_command(app)
    for word in name.split():
        command = command.commands[word]
    options = [p for p in command.params if isinstance(p, TyperOption) and p.name != "help"]
    assert options
    for option in options:
        long_name = next(n for n in option.opts if n.startswith("--"))
        assert "[default:" in blocks[long_name], f"{name} {long_name}: {blocks.get(long_name)}"
    for argument in (p for p in command.params if isinstance(p, TyperArgument)):
        assert argument.required or "[default:" in result.output, f"{name} {argument.name}"
    assert "<list[str]>" not in result.output and "<bool>" not in result.output  # readable metavars


def test_version_and_python_dash_m():
    assert runner.invoke(app, ["--version"]).output.strip() == f"aml-rapids {__version__}"
    done = subprocess.run([sys.executable, "-m", "aml_rapids", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"aml-rapids {__version__}"
    assert "--install-completion" in runner.invoke(app, ["--help"]).output


def test_backbones_lists_the_registry_without_the_test_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").write_bytes(b"x")
    result = runner.invoke(app, ["backbones", "--json"])
    assert result.exit_code == 0, result.output
    listed = {row["name"]: row for row in json.loads(result.stdout)["result"]}
    assert {"mobilenet_v2", "resnet101", "vgg16", "vit_b_16"} <= set(listed) and "tiny" not in listed
    assert listed["mobilenet_v2"]["weights"]["place"] == "torch cache" and not listed["vgg16"]["weights"]["cached"]
    assert listed["vit_b_16"]["input_size"] == "224x224" and listed["resnet101"]["dim"] == 2048
    assert listed["dinobloom_b"]["dim"] == 768 and "DinoBloom-B" in listed["dinobloom_b"]["weights"]["published"]
    table = runner.invoke(app, ["backbones"], env={"COLUMNS": "200"}).stdout
    assert "resnet101" in table and "tiny" not in table and "not here" in table and "dinobloom_l" in table


@pytest.fixture
def indexed(tmp_path):
    """A small demo set, indexed and split: the run folder."""
    out = tmp_path / "run"
    assert runner.invoke(app, ["demo-data", "-o", str(tmp_path / "demo"), "--patients", "2", "--cells", "4"]).exit_code == 0
    assert runner.invoke(app, ["index", str(tmp_path / "demo"), "-o", str(out)]).exit_code == 0
    assert runner.invoke(app, ["split", str(out / "manifest.parquet"), "--method", "image"]).exit_code == 0
    return out


def test_extract_into_a_pipe_writes_progress_lines(indexed):
    env = {**os.environ, "AML_RAPIDS_PROGRESS_SECONDS": "0"}
    done = subprocess.run([sys.executable, "-m", "aml_rapids", "extract", str(indexed / "manifest.parquet"), *TINY],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = re.findall(r"extracting tiny: [\d,]+/[\d,]+ img \(\d+%\), [\d,.]+ img/s, ETA \d+:\d\d:\d\d", done.stderr)
    assert len(lines) >= 2, done.stderr  # one per chunk of 8 rows, of 40 train/val/test rows
    assert re.search(r"extracting tiny: 40/40 img \(100%\), [\d,.]+ img/s, done in", done.stderr), done.stderr
    assert "extracting on the CPU" in done.stderr
    assert re.search(r"tiny \(16 features, weights none \(random initialisation\), (torch|openvino|onnxruntime) "
                     r"(fp32|bf16)\)", done.stderr), done.stderr  # the engine and precision auto chose, named
    assert done.stdout == ""  # stdout is kept for --json


def test_two_runs_into_one_folder_leave_two_records_and_two_logs(indexed):
    for _ in range(2):
        assert runner.invoke(app, ["extract", str(indexed / "manifest.parquet"), *TINY]).exit_code == 0
    records = run_records(indexed, "extract")
    assert len(records) == 2 and records[0]["run_id"] != records[1]["run_id"]
    assert [r["details"]["rows_written"] for r in records] == [40, 0]
    logs = [(indexed / "runs" / f"{record['run_id']}.log").read_text() for record in records]
    assert "extracting tiny: 40/40 img" in logs[0] and "40 rows written, 0 already done" in logs[0]
    assert "INFO    0 rows written, 40 already done (skipped)" in logs[1]
    assert len(run_records(indexed)) == 2 + 2  # index and split: their own records beside them


def test_quiet_verbose_and_json(indexed):
    quiet = runner.invoke(app, ["extract", str(indexed / "manifest.parquet"), *TINY, "-q"])
    assert quiet.exit_code == 0 and quiet.output == ""
    [record] = run_records(indexed, "extract")
    assert "rows written" in (indexed / "runs" / f"{record['run_id']}.log").read_text()  # the log keeps all
    verbose = runner.invoke(app, ["extract", str(indexed / "manifest.parquet"), *TINY, "-v", "--json"])
    assert verbose.exit_code == 0 and "run id" in verbose.stderr
    summary = json.loads(verbose.stdout)
    assert summary["command"] == "extract" and summary["exit_code"] == 0
    assert summary["result"]["rows_skipped"] == 40 and summary["result"]["store"].endswith("features.zarr")
    assert summary["run_id"] == run_records(indexed, "extract")[-1]["run_id"]
    failed = runner.invoke(app, ["index", str(indexed / "missing"), "--json"])
    assert failed.exit_code == 3
    assert json.loads(failed.stdout) | {"run_id": None} == {
        "command": "index", "run_id": None, "exit_code": 3, "error": failed.stderr.strip().removeprefix("error: ")}


@pytest.mark.slow
def test_run_records_every_stage_and_evaluate_writes_what_it_rests_on(tmp_path):
    out = tmp_path / "run"
    runner.invoke(app, ["demo-data", "-o", str(tmp_path / "demo"), "--patients", "4", "--cells", "6"])
    result = runner.invoke(app, ["run", str(tmp_path / "demo"), "-o", str(out), *TINY, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert list(summary["result"]["stages"]) == ["index", "split", "extract", "train", "evaluate"]
    ids = {r["run_id"] for folder in (out, out / "model", out / "model" / "eval-test") for r in run_records(folder)}
    assert ids == {summary["run_id"]}  # one run id for all of run's stages, one log
    assert [r["stage"] for r in run_records(out)] == ["index", "split", "extract"]
    assert [p.name for p in (out / "runs").glob("*.log")] == [f"{summary['run_id']}.log"]
    report_dir = out / "model" / "eval-test"
    [record] = run_records(report_dir, "evaluate")
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["split_protocol"] == "patient-grouped split"
    assert metrics["source"]["store"] == str(out / "features.zarr") and metrics["source"]["model"] == str(out / "model")
    assert metrics["source"]["manifests"][0]["digest"] and metrics["source"]["split"]["seed"] == 0
    assert metrics["source"]["run_id"] == summary["run_id"] and metrics["source"]["time_utc"]
    assert metrics["bootstrap"] == {"samples": 1000, "seed": 0, "interval": "percentile 95%",
                                    "resampled": "patients, within each class"}
    assert any(w.startswith("5 of 5 classes have fewer than evaluate.min_patients = 5 patients in split test (CBFB_MYH11 1,")
               for w in metrics["warnings"])
    assert record["details"]["warnings"] == metrics["warnings"]
    cells = pd.read_csv(report_dir / "predictions.csv")
    assert len(cells) == metrics["cell_level"]["n"] and {"cell_id", "patient", "label", "predicted"} <= set(cells)
    assert (cells["predicted"] == cells["label"]).mean() == pytest.approx(metrics["cell_level"]["accuracy"])
    assert {p.name for p in report_dir.iterdir()} >= {"confusion.png", "confusion.svg", "roc.png", "roc.svg"}
    again = runner.invoke(app, ["evaluate", str(out / "model"), str(out / "features.zarr"), "--set",
                                "evaluate.bootstrap_samples=50", "--set", "evaluate.min_patients=1"])
    assert again.exit_code == 0, again.output
    assert len(run_records(report_dir, "evaluate")) == 2
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["bootstrap"]["samples"] == 50 and not any("min_patients" in w for w in metrics["warnings"])
    predicted = runner.invoke(app, ["predict", str(out / "model"), str(tmp_path / "demo"), "-o", str(tmp_path / "p")])
    assert predicted.exit_code == 0, predicted.output
    [record] = run_records(tmp_path / "p", "predict")
    assert record["details"]["cells"] == 120 and record["details"]["seen_in_training"] > 0


def test_sigterm_stops_extract_cleanly_and_a_rerun_resumes(tmp_path):
    """A scheduler's SIGTERM at a job's time limit: exit 143 with finished chunks kept, then resume."""
    out = tmp_path / "run"
    runner.invoke(app, ["demo-data", "-o", str(tmp_path / "demo"), "--patients", "2", "--cells", "20"])
    runner.invoke(app, ["index", str(tmp_path / "demo"), "-o", str(out)])
    net = ["--set", "features.backbones=[{name: mobilenet_v2, weights: none}]", "--set", "features.store_dtype=float32",
           "--set", "loader.image_size=64", "--set", "loader.batch_size=8", "--set", "features.chunk_batches=1"]
    command = [sys.executable, "-m", "aml_rapids", "extract", str(out / "manifest.parquet"), *net]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "AML_RAPIDS_PROGRESS_SECONDS": "0"}) as job:
        for line in job.stderr:
            if line.startswith("extracting mobilenet_v2: 16/"):  # two of 25 chunks done
                job.send_signal(signal.SIGTERM)
                break
        rest = job.stderr.read()
    assert job.wait(timeout=120) == 143, rest
    assert "Task was destroyed" not in rest and "never retrieved" not in rest  # zarr's cut-short tasks, quiet
    assert "terminated (SIGTERM); finished work is kept" in rest
    again = runner.invoke(app, ["extract", str(out / "manifest.parquet"), *net])
    assert again.exit_code == 0, again.output
    done = run_records(out, "extract")[-1]["details"]
    assert done["rows_skipped"] >= 16 and done["rows_written"] + done["rows_skipped"] == 200


def test_strict_is_an_error_json_reports_and_quiet_still_shows(tmp_path):
    from conftest import write_image

    write_image(tmp_path / "data" / "a" / "p1" / "x.png", fmt="PNG")
    write_image(tmp_path / "data" / "b" / "p2" / "y.png", fmt="PNG")
    (tmp_path / "data" / "b" / "p2" / "broken.tif").write_bytes(b"not an image")
    result = runner.invoke(app, ["index", str(tmp_path / "data"), "-o", str(tmp_path / "run"), "--strict", "-q",
                                 "--json"])
    assert result.exit_code == 5
    assert json.loads(result.stdout)["exit_code"] == 5 and "broken.tif" in result.stderr
    assert "--strict: 1 files or folders were rejected" in result.stderr


def test_mistyped_inputs_make_no_output_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["index", "nowhere"]).exit_code == 3
    assert runner.invoke(app, ["evaluate", "typo", "nostore.zarr"]).exit_code == 3
    assert runner.invoke(app, ["cv", "nostore.zarr"]).exit_code == 3
    assert runner.invoke(app, ["evaluate", "typo", "nostore.zarr", "--split", "train"]).exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_run_records_skip_what_is_not_a_record(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "torn.json").write_text("{ not json")
    (tmp_path / "runs" / "x-y.json").write_text("[1, 2]")
    assert run_records(tmp_path) == []
