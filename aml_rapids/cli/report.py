"""One HTML page for a run or a study folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..logs import say
from ._common import command


def register(app: typer.Typer) -> None:
    @command(app)
    def report(
        folder: Annotated[Path, typer.Argument(metavar="DIR", show_default=False,
                                               help="Run folder (aml-rapids run) or study folder (aml-rapids study).")],
    ) -> Path:
        """Write DIR/report.html: one self-contained page (plots embedded) with the metrics, tables, config,
        provenance and each stage's time, read from what the stages wrote."""
        from ..report.render import render_report

        page = render_report(folder)
        say(f"report: {page}")
        return page
