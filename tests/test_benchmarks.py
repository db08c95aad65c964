"""The benchmark suite runs end to end on a tiny count and writes well-formed results (no speed is asserted)."""

import json

import pytest

from benchmarks.__main__ import main
from benchmarks.report import latest_runs, markdown


@pytest.mark.slow
def test_every_benchmark_stage_writes_results(tmp_path):
    results = tmp_path / "results.jsonl"
    main(["loader", "--count", "48", "--repeats", "1", "--batch-size", "16", "--cache", str(tmp_path),
          "--results", str(results)])
    main(["extract", "--count", "32", "--repeats", "1", "--batch-size", "16", "--cache", str(tmp_path),
          "--results", str(results), "--backbones", "tiny", "--no-warmup"])
    main(["classify", "--rows", "120", "--pca", "8", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"loader", "extract", "classify"} and len(rows) == 8 + 5
    for row in rows:
        assert row["items"] in (48, 32, 120) and row["items_per_s"] > 0 and row["machine"]["cores"] >= 1
        assert "torch" in row["versions"] and row["params"]["count"] in (48, 32, 120)
    table = markdown(latest_runs(results))
    assert table.count("\n") == 2 + 13 - 1 and "naive" in table and "sklearn stacking fit" in table
