"""Commands on networks and feature stores: finetune, extract, export, backbones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import workflow
from ._common import (AllowFailedOpt, ConfigOpt, ManifestArg, OverwriteOpt, SetOpt, command, from_config,
                      json_requested, out_option, resolve_config)


def register(app: typer.Typer) -> None:
    @command(app)
    def finetune(
        manifest: ManifestArg,
        backbone: Annotated[Optional[str], typer.Option(
            metavar="NAME", show_default=from_config("finetune.backbone"),
            help="Registry network to fine-tune (`aml-rapids backbones` lists them).")] = None,
        weights: Annotated[Optional[str], typer.Option(
            metavar="imagenet|FILE|none", show_default=from_config("finetune.weights"),
            help="Weights it starts from.")] = None,
        epochs: Annotated[Optional[int], typer.Option(
            metavar="N", show_default=from_config("finetune.epochs"), help="At most this many epochs.")] = None,
        out: Annotated[Optional[Path], out_option("finetune-<backbone> beside the manifest",
                                                  "Fine-tuning folder (weights, checkpoint, curves, report)")] = None,
        overwrite: OverwriteOpt = False,
        allow_failed: Annotated[bool, typer.Option(
            "--allow-failed", show_default="off",
            help="Exit 0 even if some cells' files could not be read (training went on without them; "
                 "finetune.json lists them).")] = False,
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> workflow.Finetuned:
        """Fine-tune a backbone with a new head on the manifest's train split (the published policy: Adam 1e-4,
        batch 32, at most 50 epochs, validated every 30 mini-batches); run again after a kill, it resumes from the
        last checkpoint. Writes best.pt (extract loads it as weights), curves.png, steps.csv, finetune.json and the
        head's own test report."""
        cfg = resolve_config(config, set_, **{"finetune.backbone": backbone, "finetune.weights": weights,
                                              "finetune.epochs": epochs})
        return workflow.finetune(manifest, out, cfg, overwrite, allow_failed)

    @command(app)
    def extract(
        manifest: ManifestArg,
        out: Annotated[Optional[Path], out_option("features.zarr beside the manifest", "Zarr feature store",
                                                  "--store", "-s")] = None,
        allow_failed: AllowFailedOpt = False,
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> workflow.Extracted:
        """Extract features of every configured backbone into a Zarr v3 store; resumes, retries rows that failed
        before, and appends new cells. One process writes a store at a time (a second is refused, exit code 7)."""
        return workflow.extract(manifest, out, resolve_config(config, set_), allow_failed)

    @command(app)
    def export(
        backbone: Annotated[str, typer.Argument(metavar="BACKBONE", show_default=False,
                                                help="Registry network (`aml-rapids backbones` lists them).")],
        out: Annotated[Optional[Path], out_option("export-<backbone>", "Export folder")] = None,
        weights: Annotated[str, typer.Option(metavar="imagenet|FILE|none", help="The network's weights.")] = "imagenet",
        formats: Annotated[str, typer.Option("--format", metavar="onnx,openvino",
                                             help="Formats to write, comma-separated.")] = "onnx,openvino",
        precision: Annotated[str, typer.Option(metavar="fp32|int8",
                                               help="int8: quantised by NNCF, calibrated on --cells.")] = "fp32",
        cells: Annotated[Optional[Path], typer.Option(
            metavar="SOURCE", show_default="synthetic demo cells (fp32 only)",
            help="Manifest, folder or CSV whose training cells the export is checked (and int8 calibrated) on.")] = None,
        overwrite: OverwriteOpt = False,
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ):
        """Write a backbone as ONNX and OpenVINO IR for edge devices: its input normalisation inside (it takes
        segmented, resized RGB cells in [0, 1]), fp32 or int8, with export.json naming input, output, files and
        sha256, and checked against PyTorch fp32 on cells before any file is written (exit 11 if it disagrees)."""
        from ..features.export import export_backbone
        from ..outputs import slug

        return export_backbone(backbone, weights, out or Path(f"export-{slug(backbone)}"), resolve_config(config, set_),
                               tuple(f.strip() for f in formats.split(",") if f.strip()), precision, cells, overwrite)

    @command(app)
    def backbones() -> list[dict]:
        """List the feature extractors: the torchvision networks, the hematology presets and the timm models whose
        weights this machine holds (any timm model works as timm:NAME); feature size, layer, input size, and
        whether its published weights are here (nothing is downloaded; `aml-rapids weights fetch` does that, and a
        local weights file works for any of them)."""
        from rich.console import Console
        from rich.table import Table

        from ..features.weights import list_backbones

        rows = list_backbones()
        table = Table(caption="published weights are read from aml-rapids' registered files, TORCH_HOME and HF_HOME; "
                              "offline, fetch them elsewhere (`aml-rapids weights fetch NAME --to DIR`), or set "
                              "weights to a local file, or none", caption_justify="left")
        for column in ("name", "dim", "layer", "input", "published weights", "here"):
            table.add_column(column)
        for row in rows:
            weights = row["weights"]
            table.add_row(row["name"], str(row["dim"]), row["layer"], row["input_size"] or "any",
                          weights["published"] or "none", weights["place"] or "not here")
        if not json_requested():
            Console(markup=False, highlight=False, emoji=False).print(table)  # the listing is the command's output: stdout
        return rows
