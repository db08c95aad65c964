"""``aml-rapids weights``: published weights for offline compute nodes, fetched where there is internet or
registered from a local file, and what this machine holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..logs import say, warn
from ._common import command, json_requested

weights_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Published weights for offline nodes: fetch (or register a local file), list.")


def register(app: typer.Typer) -> None:
    app.add_typer(weights_app, name="weights")


@command(weights_app)
def fetch(
    names: Annotated[str, typer.Argument(
        metavar="NAME[,NAME...]", show_default=False,
        help="Backbones, comma-separated (`aml-rapids backbones`): torchvision names, timm:NAME, "
             "timm:hf-hub:ORG/REPO, presets.")],
    to: Annotated[Optional[Path], typer.Option(
        "--to", metavar="DIR", show_default="the caches the loaders read (TORCH_HOME, HF_HOME)",
        help="Download into DIR/torch and DIR/huggingface instead, to copy to an offline node.")] = None,
    file: Annotated[Optional[Path], typer.Option(
        "--file", metavar="FILE", show_default="download",
        help="Register this local weights file as NAME's published weights (checked to load, sha256 kept).")] = None,
) -> list[dict]:
    """Download backbones' published weights on a machine with internet (the only command that downloads), or
    register a local file as one backbone's; every other command reads them offline. Exit 12 if a download
    fails."""
    from ..features.weights import fetch_weights

    rows = fetch_weights([n.strip() for n in names.split(",") if n.strip()], to, file)
    for row in rows:
        say(f"{row['backbone']}: {row['path']} ({row['place']}, sha256 {row['sha256'][:16]}...)")
    if to is not None:
        say(f"copy {to} to the offline node and set TORCH_HOME={to / 'torch'} and HF_HOME={to / 'huggingface'} there")
    return rows


@command(weights_app, "list")
def list_() -> list[dict]:
    """The weights files this machine holds (registered, torch's cache, the Hugging Face cache), with the
    backbone each is for, its size and sha256."""
    from rich.console import Console
    from rich.table import Table

    from ..features.published import cached

    rows = cached()
    table = Table(caption="registered: aml-rapids weights fetch NAME --file FILE; the caches: TORCH_HOME, HF_HOME",
                  caption_justify="left")
    for column in ("backbone", "place", "MB", "sha256", "path"):
        table.add_column(column)
    for row in rows:
        damaged = " DAMAGED: not the registered file" if row["intact"] is False else ""
        table.add_row(row["backbone"] or "?", row["place"], f"{(row['bytes'] or 0) / 1e6:.1f}",
                      (row["sha256"] or "missing")[:16] + damaged, row["path"])
    for row in (r for r in rows if r["intact"] is False):
        warn(f"{row['path']} is not the file registered for {row['backbone']}: register it again")
    if not json_requested():
        Console(markup=False, highlight=False, emoji=False).print(table)
    return rows
