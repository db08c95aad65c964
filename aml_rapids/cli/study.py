"""A study: variants of one config, run and compared on the same cells."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import SetOpt, command, out_option


def register(app: typer.Typer) -> None:
    @command(app)
    def study(
        spec: Annotated[Path, typer.Argument(metavar="STUDY.yaml", show_default=False,
                                             help="Study file: base config, reference and variants.")],
        data: Annotated[Optional[Path], typer.Argument(
            metavar="DATA", show_default="the study folder's own, when resuming",
            help="Dataset folder or CSV, indexed and split once for every variant.")] = None,
        out: Annotated[Optional[Path], out_option("runs/<study name>-<hash>", "Study folder")] = None,
        allow_failed: Annotated[bool, typer.Option(
            "--allow-failed", show_default="off",
            help="Exit 0 when some variants failed (they are named, and the others compared).")] = False,
        set_: SetOpt = None,
    ):
        """Run every variant of a study that has not run yet (extract, train, evaluate; or cross-validate), sharing
        one store between variants with the same extraction settings, then compare them on the same cells:
        results.csv/.md, McNemar's tests against the reference (mcnemar.csv) and their ROC curves (roc.png/.svg).
        A variant that fails is reported and the others go on (exit code 9, or 0 with --allow-failed)."""
        from ..study.runner import run_study, slug
        from ..study.spec import read_spec

        return run_study(spec, out or Path("runs") / slug(read_spec(spec).name), data, set_, allow_failed)
