"""Commands on cohorts: drift."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import workflow
from ._common import ConfigOpt, SetOpt, command, out_option, resolve_config


def register(app: typer.Typer) -> None:
    @command(app)
    def drift(
        reference: Annotated[Path, typer.Argument(
            metavar="REFERENCE_STORE", show_default=False,
            help="Feature store of the reference cohort (e.g. the one a model was trained on).")],
        new: Annotated[Path, typer.Argument(
            metavar="NEW_STORE", show_default=False,
            help="Feature store of the new cohort, extracted with the same config.")],
        model: Annotated[Optional[Path], typer.Option(
            metavar="MODEL", show_default="none",
            help="A cell-level model folder: also compare the class mix it predicts in each cohort.")] = None,
        out: Annotated[Optional[Path], out_option("drift beside NEW_STORE", "Drift folder")] = None,
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> workflow.Drifted:
        """Does the new cohort look unlike the reference? Per backbone, a domain classifier's AUROC (logistic
        regression in PCA space, patient-grouped folds: 0.5 alike, 1 apart) flags drift when it reaches
        drift.auroc_threshold (0.75); an MMD two-sample test's p-value, the colour of the segmented cells and,
        with --model, the predicted class mix are reported beside it. Writes drift.json and drift.png/.svg.
        Stores whose features were made otherwise (other backbones, weights, image size, segmentation, stain
        normalisation) are
        refused (exit code 2). Settings: the config's drift section (docs/drift.md)."""
        return workflow.drift(reference, new, out, resolve_config(config, set_), model)
