"""The documentation's examples run as they stand: every ```python block of a page, in order, in one namespace,
in an empty folder."""

from __future__ import annotations

import pytest

from conftest import REPO, python_blocks


@pytest.mark.slow
def test_python_api_page_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in python_blocks(REPO / "docs" / "python-api.md"):
        exec(compile(block, "docs/python-api.md", "exec"), namespace)
    assert (tmp_path / "runs" / "steps" / "model" / "eval-test" / "metrics.json").is_file()
