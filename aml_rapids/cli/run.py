"""The whole pipeline in one command, and the resolved config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import workflow
from ..config import dump_config
from ._common import AllowFailedOpt, ConfigOpt, SetOpt, command, json_requested, out_option, resolve_config


def register(app: typer.Typer) -> None:
    @command(app)
    def run(
        data: Annotated[Optional[Path], typer.Argument(
            metavar="DATA", show_default="synthetic demo cells", help="Dataset folder or CSV.")] = None,
        out: Annotated[Optional[Path], out_option("runs/<DATA name>, or runs/demo", "Run folder")] = None,
        allow_failed: AllowFailedOpt = False,
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> workflow.RunResult:
        """index -> split -> extract -> train -> evaluate into one folder (cross-validation instead of train and
        evaluate when split.method is kfold). Without DATA: draws the synthetic demo set and runs it offline with
        MobileNetV2 (random weights) on whatever device there is."""
        return workflow.run(data, out, config, set_, allow_failed)

    @command(app, "config")
    def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> dict:
        """Print the resolved config as YAML on stdout (with no options: the published method's defaults)."""
        cfg = resolve_config(config, set_)
        if not json_requested():
            sys.stdout.write(dump_config(cfg))
        return cfg.model_dump(mode="json")
