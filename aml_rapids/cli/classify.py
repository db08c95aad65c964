"""Commands on stores and models: train, evaluate, cv, predict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import workflow
from ._common import (AllowFailedOpt, BackendOpt, ConfigOpt, LevelOpt, ModelArg, OverwriteOpt, SetOpt, StoreArg, command,
                      out_option, resolve_config)


def register(app: typer.Typer) -> None:
    @command(app)
    def train(
        store: StoreArg,
        out: Annotated[Path, out_option("model", "Model folder (new or empty, or --overwrite)")] = Path("model"),
        level: LevelOpt = "cell",
        backend: BackendOpt = None,
        overwrite: OverwriteOpt = False,
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> workflow.Trained:
        """Fit z-score + PCA + SVM/RF stacking on the store's training rows (--level patient: attention MIL on its
        training patients, stopped early on its val split or a share of them) and save the model folder (a new or
        empty folder, or --overwrite replaces an earlier model there)."""
        cfg = resolve_config(config, set_, **{"classify.backend": backend})
        return workflow.train(store, out, cfg, overwrite, level)

    @command(app)
    def evaluate(
        model: ModelArg,
        store: Annotated[Path, typer.Argument(metavar="STORE", show_default=False,
                                              help="Feature store holding the rows to evaluate.")],
        split: Annotated[str, typer.Option(metavar="NAME", help="Split to evaluate (never train).")] = "test",
        out: Annotated[Optional[Path], out_option("MODEL/eval-SPLIT", "Report folder")] = None,
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> workflow.Evaluated:
        """Metrics (per class, macro, AUC, bootstrap 95% intervals, patient level) to metrics.json, every cell's
        prediction to predictions.csv, plots to PNG and SVG. Refused (exit code 2) on any cell the model was
        trained on, matched by content, and on features extracted otherwise than the model's. Settings: the
        config's evaluate section (bootstrap, warning thresholds)."""
        return workflow.evaluate(model, store, split, out, resolve_config(config, set_))

    @command(app)
    def cv(
        store: Annotated[Path, typer.Argument(
            metavar="STORE", show_default=False,
            help="Feature store extracted from a manifest split with --method kfold.")],
        out: Annotated[Optional[Path], out_option("cv (cv-patients) beside the store", "Report folder")] = None,
        level: LevelOpt = "cell",
        backend: BackendOpt = None,
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> workflow.Evaluated:
        """Patient-grouped k-fold cross-validation: one classifier per fold, pooled out-of-fold metrics, plots
        and predictions. --level patient compares, on the same folds and cells, attention MIL against the mean
        and quantiles (patients.quantiles) of the stacking classifier's cell probabilities, with McNemar's test
        on patients."""
        cfg = resolve_config(config, set_, **{"classify.backend": backend})
        return workflow.cross_validate(store, out, cfg, level)

    @command(app)
    def predict(
        model: ModelArg,
        source: Annotated[Path, typer.Argument(
            metavar="SOURCE", show_default=False, help="Folder or CSV of new cell images, or a feature store.")],
        out: Annotated[Optional[Path], out_option(
            "MODEL/predict-<SOURCE name>", "Folder for predictions.csv and patients.csv (new or empty, or "
                                           "--overwrite)")] = None,
        overwrite: OverwriteOpt = False,
        allow_failed: AllowFailedOpt = False,
        check_drift: Annotated[bool, typer.Option(
            "--drift/--no-drift", show_default="on",
            help="Compare the cells with the model's training store: drift.json and drift.png, flagged at "
                 "drift.auroc_threshold.")] = True,
        set_: Annotated[Optional[list[str]], typer.Option(
            "--set", metavar="KEY=VALUE", show_default="none",
            help="Override a key of the config the model was made with (one that changes the features is "
                 "refused).")] = None,
    ) -> workflow.Predicted:
        """Class probabilities per cell and per patient (keyed by cohort and patient); images are extracted exactly
        as the model's training data, with the config the model records (so no -c). The cells are then compared
        with the model's training store (as `aml-rapids drift` does), and drift is flagged beside the predictions.

        A model folder is code: model.joblib is a pickle, run when loaded, so load only model folders you trust.
        model.json records the sha256 of the model's files; a file that differs is refused."""
        return workflow.predict(model, source, out, set_, overwrite, allow_failed, check_drift)
