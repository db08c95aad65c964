"""The ``aml-rapids`` command line: thin commands over ``aml_rapids.workflow``, one module per group."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import __version__
from . import classify, cohorts, data, explain, features, report, run, study, weights

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"aml-rapids {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, show_default=False, help="Print the version and exit.")] = None,
         ) -> None:
    """GPU-accelerated feature store and stacking classifier for single-cell AML images: index -> split ->
    extract -> train -> evaluate, each a command (`aml-rapids run` chains them). Settings come from YAML
    configs (`aml-rapids config` prints the defaults); every command has --help, -q/-v and --json."""


for group in (data, features, classify, cohorts, explain, run, study, report, weights):
    group.register(app)
