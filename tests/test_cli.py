"""The command line end to end on synthetic data: demo-data -> index -> split, help, exit codes, provenance."""

import json

import pytest
from typer.testing import CliRunner

from aml_rapids.cli import app
from aml_rapids.data.manifest import read_manifest
from aml_rapids.provenance import run_records

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["index"], ["split"], ["demo-data"], ["config"]])
def test_help(command):
    result = runner.invoke(app, command + ["--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_demo_index_split(tmp_path):
    demo, out = tmp_path / "demo", tmp_path / "run"
    assert runner.invoke(app, ["demo-data", "-o", str(demo), "--patients", "3", "--cells", "4"]).exit_code == 0
    result = runner.invoke(app, ["index", str(demo), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "60 cells, 15 patients, 5 classes" in " ".join(result.output.split())
    result = runner.invoke(app, ["split", str(out / "manifest.parquet"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out / "manifest.parquet")
    assert set(manifest.table["split"]) == {"train", "val", "test"}
    assert manifest.meta["split"]["seed"] == 3
    [record] = run_records(out, "split")
    assert record["config"]["split"]["seed"] == 3 and "python" in record["versions"]
    assert record["machine"]["cores"] >= 1
    assert (out / "config.yaml").read_text().count("seed: 3") == 1


def test_exit_codes(tmp_path):
    assert runner.invoke(app, ["index", str(tmp_path / "missing")]).exit_code == 3
    assert runner.invoke(app, ["config", "--set", "split.nope=1"]).exit_code == 2
    demo = tmp_path / "demo"
    runner.invoke(app, ["demo-data", "-o", str(demo), "--patients", "2", "--cells", "2"])
    (demo / "NPM1" / "synthetic_NPM1_00" / "broken.tif").write_bytes(b"")
    result = runner.invoke(app, ["index", str(demo), "-o", str(tmp_path / "r"), "--strict"])
    assert result.exit_code == 5 and "broken.tif" in result.output
    result = runner.invoke(app, ["split", str(tmp_path / "r" / "manifest.parquet")])
    assert result.exit_code == 4 and "Best feasible split" in result.output


def test_preview_and_extract(tmp_path):
    demo, out = tmp_path / "demo", tmp_path / "run"
    runner.invoke(app, ["demo-data", "-o", str(demo), "--patients", "2", "--cells", "3"])
    runner.invoke(app, ["index", str(demo), "-o", str(out)])
    manifest = str(out / "manifest.parquet")
    result = runner.invoke(app, ["preview", manifest, "--per-class", "1", "--stats-per-class", "2"])
    assert result.exit_code == 0, result.output
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "foreground fraction" in result.output
    tiny = ["--set", "features.backbones=[{name: tiny, weights: none, engine: torch, precision: fp32}]", "--set", "loader.batch_size=8",
            "--set", "features.chunk_batches=1", "--set", "loader.image_size=32", "--set", "loader.device=cpu"]
    result = runner.invoke(app, ["extract", manifest, *tiny])
    assert result.exit_code == 0, result.output
    assert "30 rows written, 0 already done (skipped), 0 failed" in " ".join(result.output.split())
    result = runner.invoke(app, ["extract", manifest, *tiny])
    assert "0 rows written, 30 already done (skipped)" in " ".join(result.output.split())
    record = run_records(out, "extract")[-1]
    assert record["details"]["store_summary"]["ok"] == 30
    result = runner.invoke(app, ["extract", manifest, *tiny, "--set", "segmentation.enabled=false"])
    assert result.exit_code == 2 and "another configuration" in result.output


@pytest.mark.slow
def test_run_with_no_data_is_the_offline_demo(tmp_path):
    result = runner.invoke(app, ["run", "-o", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "demo" / "model" / "eval-test" / "metrics.json").read_text())
    assert report["split_protocol"] == "patient-grouped split" and report["cell_level"]["n"] > 0
    assert report["backbones"]["mobilenet_v2"]["pretrained"] is False
    assert (tmp_path / "demo" / "model" / "eval-test" / "roc.png").is_file()


def test_option_values_are_taken_literally(tmp_path):
    """A CSV column called 'yes' stays a string, not YAML's boolean."""
    from conftest import write_image
    write_image(tmp_path / "a.png", fmt="PNG")
    (tmp_path / "list.csv").write_text("path,yes\na.png,blast\n")
    result = runner.invoke(app, ["index", str(tmp_path / "list.csv"), "--label-column", "yes", "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert list(read_manifest(tmp_path / "r" / "manifest.parquet").table["label"]) == ["blast"]
