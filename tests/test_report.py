"""The HTML report: one self-contained page that shows what a run or a study folder holds."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aml_rapids.cli import app

from test_usability import TINY

runner = CliRunner()


class _Page(HTMLParser):
    """The page's images, tables and text, parsed the way a browser's parser reads them."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self.text, self.open = [], 0, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        self.tables += tag == "table"
        if tag not in ("img", "meta", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: Path) -> _Page:
    parsed = _Page()
    parsed.feed(page.read_text())
    assert parsed.open == []  # every tag closed
    return parsed


@pytest.mark.slow
def test_the_report_of_a_run_embeds_every_plot_and_names_what_it_rests_on(tmp_path):
    runner.invoke(app, ["demo-data", "-o", str(tmp_path / "demo"), "--patients", "4", "--cells", "6"])
    out = tmp_path / "run"
    assert runner.invoke(app, ["run", str(tmp_path / "demo"), "-o", str(out), *TINY,
                               "--set", "evaluate.bootstrap_samples=50"]).exit_code == 0
    result = runner.invoke(app, ["report", str(out), "--json"])
    assert result.exit_code == 0, result.output
    page = _parse(Path(json.loads(result.stdout)["result"]))
    plots = sorted(p.name for p in (out / "model" / "eval-test").glob("*.png"))
    assert sorted(img["alt"] for img in page.images) == plots == ["confusion.png", "roc.png", "roc_patients.png"]
    for img in page.images:  # the page travels alone: every picture inside it, byte for byte
        data = img["src"].removeprefix("data:image/png;base64,")
        assert base64.b64decode(data) == (out / "model" / "eval-test" / img["alt"]).read_bytes()
    text = " ".join(" ".join(page.text).split())
    metrics = json.loads((out / "model" / "eval-test" / "metrics.json").read_text())
    assert f"{metrics['cell_level']['accuracy']:.3f}" in text and "patient-grouped split" in text
    assert "NOT pretrained" in text and metrics["warnings"][0] in text and metrics["source"]["run_id"] in text
    assert all(stage in text for stage in ("index", "split", "extract", "train", "evaluate"))


def test_a_folder_without_results_is_refused(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 3 and "no results to report" in result.output


def test_a_torn_metrics_file_is_named(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text('{"split": "te')
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 3 and "metrics.json cannot be read" in result.output
