"""Commands on images and manifests: index, split, preview, demo-data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import workflow
from ..errors import RejectedFiles
from ._common import ConfigOpt, ManifestArg, SetOpt, command, from_config, out_option, resolve_config


def register(app: typer.Typer) -> None:
    @command(app)
    def index(
        source: Annotated[Path, typer.Argument(
            metavar="SOURCE", show_default=False,
            help="Dataset folder (<class>/<patient>/<image> or <class>/<image>) or a CSV of paths and labels.")],
        out: Annotated[Optional[Path], out_option("runs/<SOURCE name>")] = None,
        strict: Annotated[bool, typer.Option(
            "--strict", show_default="off", help="Exit with code 5 if any file was rejected.")] = False,
        label_column: Annotated[Optional[str], typer.Option(
            metavar="NAME", show_default=from_config("index.label_column") + ", i.e. label, class or diagnosis",
            help="CSV column holding the class.")] = None,
        cohort: Annotated[Optional[str], typer.Option(
            metavar="NAME", show_default=from_config("index.cohort") + ", i.e. the CSV's column or the folder's name",
            help="Cohort name for every row.")] = None,
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> workflow.Indexed:
        """Scan images, check each one, and write manifest.parquet and rejects.csv."""
        cfg = resolve_config(config, set_, **{"index.label_column": label_column, "index.cohort": cohort})
        result = workflow.index(source, out, cfg)
        if strict and result.rejected:
            raise RejectedFiles(f"--strict: {len(result.rejected):,} files or folders were rejected, listed in "
                                f"{result.rejects}")
        return result

    @command(app)
    def split(
        manifest: ManifestArg,
        method: Annotated[Optional[str], typer.Option(
            metavar="patient|image|kfold|cohort|all", show_default=from_config("split.method"),
            help="Split protocol: patient-grouped parts, image-level parts, patient-grouped folds, whole cohorts "
                 "(--test-cohort), or every row in train (a model to deploy).")] = None,
        test_cohort: Annotated[Optional[list[str]], typer.Option(
            metavar="NAME", show_default=from_config("split.test_cohorts"),
            help="cohort: a cohort to test on (repeat for several); the others train.")] = None,
        val_cohort: Annotated[Optional[list[str]], typer.Option(
            metavar="NAME", show_default=from_config("split.val_cohorts"),
            help="cohort: a validation cohort (repeat for several); none: split.val of the training cohorts.")] = None,
        seed: Annotated[Optional[int], typer.Option(metavar="N", show_default=from_config("split.seed"), help="Random seed.")] = None,
        folds: Annotated[Optional[int], typer.Option(
            metavar="N", show_default=from_config("split.folds"), help="Number of folds for kfold.")] = None,
        allow_incomplete: Annotated[Optional[bool], typer.Option(
            "--allow-incomplete", show_default=from_config("split.allow_incomplete"),
            help="Write the best feasible split even if a class misses a part.")] = None,
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> workflow.Splitted:
        """Add a seeded split (or fold) column to a manifest, in place; no group ever straddles two parts."""
        cfg = resolve_config(config, set_, **{"split.method": method, "split.seed": seed, "split.folds": folds,
                                              "split.allow_incomplete": allow_incomplete,
                                              "split.test_cohorts": test_cohort, "split.val_cohorts": val_cohort})
        return workflow.split(manifest, cfg)

    @command(app)
    def preview(
        manifest: ManifestArg,
        out: Annotated[Optional[Path], out_option("the manifest's folder", "Folder for preview.png")] = None,
        per_class: Annotated[int, typer.Option(min=1, metavar="N", help="Cells per class in the grid.")] = 3,
        stats_per_class: Annotated[int, typer.Option(
            min=0, metavar="N", help="Cells per class for the foreground statistics (0: none).")] = 200,
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> workflow.Previewed:
        """Write preview.png, a grid of original / HSV mask / segmented / augmented cells with each cell's
        foreground share, and print the mask's foreground share per class."""
        return workflow.preview(manifest, out, resolve_config(config, set_), per_class, stats_per_class)

    @command(app, "demo-data")
    def demo_data(
        out: Annotated[Path, out_option("demo-data", "Folder to write <class>/<patient>/<image>.tif into (new, "
                                                     "empty, or an earlier demo set)")] = Path("demo-data"),
        patients: Annotated[int, typer.Option(min=1, metavar="N", help="Patients per class.")] = 4,
        cells: Annotated[int, typer.Option(min=1, metavar="N", help="Cells per patient.")] = 30,
        seed: Annotated[int, typer.Option(metavar="N", help="Random seed.")] = 0,
    ) -> Path:
        """Draw a small synthetic dataset (5 classes, clearly labelled synthetic) so everything runs offline."""
        return workflow.demo_data(out, patients, cells, seed)
