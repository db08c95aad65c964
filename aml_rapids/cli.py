"""The ``aml-rapids`` command line: a thin layer that reads a config, calls one stage, and reports."""

from __future__ import annotations

import errno
import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .config import RunConfig, dump_config, load_config
from .errors import EXIT_INTERRUPTED, EXIT_REJECTS, AmlRapidsError, DataError, FailedRowsError, OutputError
from .outputs import prepare_output_dir
from .progress import console, progress_bar, say
from .provenance import write_run_record

app = typer.Typer(help="GPU-accelerated feature store and stacking classifier for single-cell AML images.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: built-in)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a config key, e.g. split.seed=3")]
ManifestArg = Annotated[Path, typer.Argument(help="manifest.parquet written by `aml-rapids index` (and split)")]
AllowFailedOpt = Annotated[bool, typer.Option(
    "--allow-failed", help="exit 0 even if some cells' files could not be read (they are stored as failed)")]

# A file system refusing a write is the user's to fix (space, permissions), wherever it happens.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _errors_to_exit_codes(fn):
    """Show a user-fixable problem as one red line and exit with its code, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AmlRapidsError as exc:
            say(str(exc), "error: ", "red")
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            if exc.errno not in WRITE_ERRNOS:
                raise
            say(f"{exc.filename or ''}: {exc.strerror}".lstrip(": "), "error: ", "red")
            raise typer.Exit(OutputError.exit_code) from None
        except KeyboardInterrupt:
            say("interrupted; finished work is kept (extract resumes where it stopped)", "error: ", "red")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def _warn(text: str) -> None:
    say(text, "warning: ", "yellow")


def _failed_rows(failures, what: str, allow_failed: bool) -> None:
    """Name the cells whose files could not be read; without --allow-failed that is exit code 6."""
    from .data.scan import printable

    if not failures:
        return
    for problem in failures[:5]:
        say(f"{printable(problem.path)}: {problem.reason}", "  failed ", "yellow")
    message = (f"{len(failures):,} cells could not be read ({what}); a re-run retries them once their files are "
               "back or re-indexed")
    if not allow_failed:
        raise FailedRowsError(message + "; --allow-failed accepts them")
    _warn(message)


def _config(path: Optional[Path], overrides: Optional[list[str]], **cli: object) -> RunConfig:
    """Config file < --set overrides < explicit CLI options (those not left at None)."""
    extra = [f"{key}={json.dumps(value)}" for key, value in cli.items() if value is not None]  # JSON: stays a str
    return load_config(path, list(overrides or []) + extra)


@app.command("config")
@_errors_to_exit_codes
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config as YAML (with no arguments: the published method's defaults)."""
    sys.stdout.write(dump_config(load_config(config, set_)))


@app.command()
@_errors_to_exit_codes
def index(
    source: Annotated[Path, typer.Argument(help="dataset folder (<class>/<patient>/<image> or <class>/<image>) or CSV")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder [default: runs/<source name>]")] = None,
    strict: Annotated[bool, typer.Option(help="exit with code 5 if any file was rejected")] = False,
    label_column: Annotated[Optional[str], typer.Option(help="CSV column holding the class")] = None,
    cohort: Annotated[Optional[str], typer.Option(help="cohort name for every row")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Scan images, check each one, and write manifest.parquet and rejects.csv."""
    from .data.manifest import build_manifest, summarize, write_manifest, write_rejects
    from .data.scan import NoUsableImages, printable

    cfg = _config(config, set_, **{"index.label_column": label_column, "index.cohort": cohort})
    out = prepare_output_dir(out or Path("runs") / (source.stem if source.suffix.lower() == ".csv" else source.name))
    try:
        with progress_bar(f"indexing {source}") as (advance, set_total):
            result = build_manifest(source, cfg.index, progress=advance, on_total=set_total)
    except NoUsableImages as exc:
        write_rejects(exc.problems, out / "rejects.csv")
        raise DataError(f"{exc}; {out / 'rejects.csv'} lists why") from None
    write_manifest(result.manifest, out / "manifest.parquet")
    write_rejects(result.problems, out / "rejects.csv")
    summary = summarize(result.manifest)
    for warning in result.warnings:
        _warn(warning)
    if result.outside_root:
        _warn(f"{len(result.outside_root):,} files lie outside the CSV's folder {result.manifest.root}, accepted: "
              + ", ".join(result.outside_root[:5]) + (" ..." if len(result.outside_root) > 5 else ""))
    write_run_record(out, "index", cfg, source=str(source), layout=result.layout, found=result.found,
                     rejected=sum(not p.skipped for p in result.problems),
                     same_class_duplicates=result.same_class_duplicates, outside_root=result.outside_root, **summary)
    table = Table(title=f"{source} ({result.layout})")
    table.add_column("class")
    table.add_column("cells", justify="right")
    for label, n in summary["per_class"].items():
        table.add_row(label, f"{n:,}")
    console.print(table)
    rejected = [p for p in result.problems if not p.skipped]
    say(f"{summary['cells']:,} cells, {summary['patients']:,} patients, {summary['classes']} classes "
        f"(of {result.found:,} candidate images); {result.same_class_duplicates:,} byte-identical copies "
        f"within a class kept; {len(rejected):,} rejected, {len(result.problems) - len(rejected):,} "
        f"non-image files skipped -> {out / 'rejects.csv'}")
    for problem in rejected[:5]:
        say(f"{printable(problem.path)}: {problem.reason}", "  rejected ", "yellow")
    say(f"manifest: {out / 'manifest.parquet'}")
    if strict and rejected:
        say(f"{len(rejected)} files or folders were rejected", "--strict: ", "red")
        raise typer.Exit(EXIT_REJECTS)


@app.command()
@_errors_to_exit_codes
def split(
    manifest: ManifestArg,
    method: Annotated[Optional[str], typer.Option(help="patient | image | kfold")] = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed")] = None,
    folds: Annotated[Optional[int], typer.Option(help="number of folds for kfold")] = None,
    allow_incomplete: Annotated[Optional[bool], typer.Option(
        "--allow-incomplete", help="write the best feasible split even if a class misses a part")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Add a seeded split (or fold) column to a manifest, in place; no group ever straddles two parts."""
    from .data.manifest import read_manifest, write_manifest
    from .data.splits import make_split

    cfg = _config(config, set_, **{"split.method": method, "split.seed": seed, "split.folds": folds,
                                   "split.allow_incomplete": allow_incomplete})
    data = read_manifest(manifest)
    result = make_split(data.table, cfg.split)
    if result.missing:
        _warn(f"classes missing from parts: {result.missing}")
    data.table = result.table
    data.meta["split"] = cfg.split.model_dump(mode="json")
    write_manifest(data, manifest)
    write_run_record(manifest.parent, "split", cfg, manifest=str(manifest),
                     counts=result.counts_by_class(), missing=result.missing)
    say(result.counts.to_string())
    say(f"{cfg.split.method} split (seed {cfg.split.seed}) written to column '{result.column}' of {manifest}")


@app.command()
@_errors_to_exit_codes
def preview(
    manifest: ManifestArg,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="PNG to write [default: beside the manifest]")] = None,
    per_class: Annotated[int, typer.Option(min=1, help="cells per class in the grid")] = 3,
    stats_per_class: Annotated[int, typer.Option(min=0, help="cells per class for foreground statistics")] = 200,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a PNG grid of original / HSV mask / segmented / augmented cells, and the mask's foreground share."""
    from .data.manifest import read_manifest
    from .loader.preview import foreground_fractions, render_preview

    cfg = _config(config, set_)
    data = read_manifest(manifest)
    out = out or manifest.parent / "preview.png"
    prepare_output_dir(out.parent)
    render_preview(data.table, data.root, cfg, out, per_class)
    stats = foreground_fractions(data.table, data.root, cfg, stats_per_class) if stats_per_class else None
    if stats is not None:
        say("foreground fraction kept by the HSV mask, per class:")
        say(stats.round(3).to_string())
    write_run_record(manifest.parent, "preview", cfg, manifest=str(manifest), png=str(out),
                     foreground=None if stats is None else stats.round(4).to_dict(orient="index"))
    say(f"preview: {out}")


@app.command()
@_errors_to_exit_codes
def extract(
    manifest: ManifestArg,
    store: Annotated[Optional[Path], typer.Option("--store", "-s", help="Zarr store [default: beside the manifest]")] = None,
    allow_failed: AllowFailedOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Extract features of every configured backbone into a Zarr v3 store; resumes, retries rows that failed
    before, and appends new cells. One process writes a store at a time (a second is refused, exit code 7)."""
    from .data.manifest import read_manifest
    from .features.extract import extract as run_extract
    from .features.store import FeatureStore

    cfg = _config(config, set_)
    data = read_manifest(manifest)
    store = store or manifest.parent / "features.zarr"
    with progress_bar(f"extracting {', '.join(b.name for b in cfg.features.backbones)}") as (advance, set_total):
        summary = run_extract(data, store, cfg, progress=advance, on_total=set_total)
    totals = FeatureStore.open(store).summary()
    write_run_record(manifest.parent, "extract", cfg, manifest=str(manifest), store=str(store),
                     rows_written=summary.rows_written, rows_failed=summary.rows_failed,
                     rows_skipped=summary.rows_skipped, rows_appended=summary.rows_appended,
                     rows_retried=summary.rows_retried, chunks_lost=summary.chunks_lost,
                     interrupted_writer=summary.interrupted_writer,
                     seconds=summary.seconds, images_per_s=summary.images_per_s, seconds_in=summary.seconds_in,
                     store_summary=totals,
                     failures=[(p.path, p.reason) for p in summary.failures])
    if summary.interrupted_writer:
        _warn(f"an earlier writer of {store} ended without finishing ({summary.interrupted_writer}); its work "
              "was checked and completed")
    if summary.rows_retried:
        say(f"retried {summary.rows_retried:,} rows that had failed before")
    if summary.chunks_lost:
        _warn(f"{summary.chunks_lost:,} chunks marked done had lost their files; computed again")
    say(f"{summary.rows_written:,} rows written, {summary.rows_skipped:,} already done (skipped), "
        f"{summary.rows_failed:,} failed, {summary.rows_appended:,} new rows appended; "
        f"{summary.images_per_s:,.0f} images/s over {summary.seconds:.1f} s")
    say("time in: " + ", ".join(f"{part} {seconds:.1f} s" for part, seconds in summary.seconds_in.items()))
    say(f"store: {store} ({totals['ok']:,} of {totals['rows'] - totals['padding']:,} rows ready)")
    _failed_rows(summary.failures, f"listed in {store / 'rows' / 'status'} as failed", allow_failed)


@app.command()
@_errors_to_exit_codes
def train(
    store: Annotated[Path, typer.Argument(help="feature store written by `aml-rapids extract`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="model folder to write")] = Path("model"),
    backend: Annotated[Optional[str], typer.Option(help="auto | cuml | sklearn")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace an earlier model (and its evaluations) in the folder")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fit z-score + PCA + SVM/RF stacking on the store's training rows and save the model folder (a new or
    empty folder, or --overwrite replaces an earlier model there)."""
    from .classify.train import train as run_train

    cfg = _config(config, set_, **{"classify.backend": backend})
    with console.status("training (z-score, PCA, out-of-fold SVM + random forest, meta-learner)"):
        info = run_train(store, cfg, out, overwrite=overwrite)
    write_run_record(out, "train", cfg, model=info)
    say(f"trained on {info['training_rows']:,} rows ({info['backend']}), classes {info['classes']}; model: {out}")
    say("time in: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in info["fit_seconds"].items()))


@app.command()
@_errors_to_exit_codes
def evaluate(
    model: Annotated[Path, typer.Argument(help="model folder written by `aml-rapids train`")],
    store: Annotated[Path, typer.Argument(help="feature store holding the rows to evaluate")],
    split: Annotated[str, typer.Option(help="split to evaluate (never train)")] = "test",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="report folder [default: MODEL/eval-SPLIT]")] = None,
) -> None:
    """Metrics (per class, macro, AUC, bootstrap 95% intervals, patient level) to metrics.json, plots to PNG.
    Refused (exit code 2) on any cell the model was trained on, matched by content, and on features extracted
    otherwise than the model's."""
    from .classify.train import evaluate as run_evaluate

    out = prepare_output_dir(out or model / f"eval-{split}", "report folder")
    report = run_evaluate(model, store, split, out)
    for warning in report["warnings"]:
        _warn(warning)
    _show_report(report, f"{split} split")
    say(f"report: {out / 'metrics.json'}, plots: {out}")


def _show_report(report: dict, title: str) -> None:
    """What was evaluated, then one line per level (cells; patients where there are some): accuracy, macro AUC
    and macro F1, each with its bootstrap 95% interval."""
    say(f"{title} ({report['split_protocol']}), backbones {', '.join(report['backbones'])}:")
    for name, key in (("cells", "cell_level"), ("patients", "patient_level")):
        if key not in report:
            continue
        level, parts = report[key], []
        for label, value, ci in (("accuracy", level["accuracy"], "accuracy"),
                                 ("macro AUC", level["macro_auc"], "macro_auc"),
                                 ("macro F1", level["macro"]["f1"], "macro_f1")):
            interval = level["ci95"].get(ci)
            parts.append(f"{label} undefined" if value is None else f"{label} {value:.3f}"
                         + (f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})" if interval else ""))
        say(f"  {name}: {', '.join(parts)}, n={level['n']:,}")


@app.command()
@_errors_to_exit_codes
def cv(
    store: Annotated[Path, typer.Argument(help="feature store extracted from a manifest split with --method kfold")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="report folder [default: beside the store]")] = None,
    backend: Annotated[Optional[str], typer.Option(help="auto | cuml | sklearn")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Patient-grouped k-fold cross-validation: one classifier per fold, pooled out-of-fold metrics and plots."""
    from .classify.crossval import cross_validate

    cfg = _config(config, set_, **{"classify.backend": backend})
    out = prepare_output_dir(out or store.parent / "cv", "report folder")

    def show(fold: dict) -> None:
        say(f"fold {fold['fold']}: {fold['cells']:,} cells, cell AUC {fold['cell_macro_auc']:.3f}"
            + (f", patient AUC {fold['patient_macro_auc']:.3f} (n={fold['patients']})"
               if fold.get("patient_macro_auc") is not None else ""))

    with console.status("cross-validating (one stacking classifier per fold)"):
        report = cross_validate(store, cfg, out, on_fold=show)
    write_run_record(out, "cv", cfg, store=str(store), folds=report["folds"])
    _show_report(report, report["split"])
    say(f"report: {out / 'metrics.json'}, out-of-fold predictions: {out / 'oof_predictions.csv'}")


@app.command()
@_errors_to_exit_codes
def predict(
    model: Annotated[Path, typer.Argument(help="model folder written by `aml-rapids train`")],
    source: Annotated[Path, typer.Argument(help="folder or CSV of new cell images, or a feature store")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="folder for predictions.csv and patients.csv")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace earlier predictions in the output folder")] = False,
    allow_failed: AllowFailedOpt = False,
    set_: SetOpt = None,
) -> None:
    """Class probabilities per cell and per patient (keyed by cohort and patient); images are extracted exactly
    as the model's training data (a --set that would change their features is refused). The output folder must
    be new or empty, or --overwrite replaces its predictions.

    A model folder is code: model.joblib is a pickle, run when loaded, so load only model folders you trust.
    model.json records the sha256 of every file in the folder; a file that differs is refused."""
    from .classify.predict import predict as run_predict

    out = out or model / f"predict-{source.stem}"
    with progress_bar(f"extracting {source}") as (advance, set_total):
        result = run_predict(model, source, out, set_, overwrite, progress=advance, on_total=set_total)
    write_run_record(out, "predict", result.config or load_config(None), model=str(model), source=str(source),
                     overrides=set_, cells=len(result.cells), patients=len(result.patients),
                     seen_in_training=result.seen_in_training, failures=[(p.path, p.reason) for p in result.failures])
    for warning in result.warnings:
        _warn(warning)
    if result.seen_in_training:
        _warn(f"{result.seen_in_training:,} of these cells were in the model's training set (column in_training "
              "of predictions.csv): their predictions say nothing about new cells")
    say(f"{len(result.cells):,} cells, {len(result.patients):,} patients predicted: {out / 'predictions.csv'}, "
        f"{out / 'patients.csv'}")
    _failed_rows(result.failures, f"listed in {out / 'failed.csv'}", allow_failed)


DEMO_SETTINGS = [
    # Offline on a CPU: MobileNetV2 alone, without pretrained weights (none can be downloaded offline); its random
    # features are ~1e-8 in size, below float16's range, hence float32 storage.
    "features.backbones=[{name: mobilenet_v2, weights: none}]", "features.store_dtype=float32",
    "loader.batch_size=64", "features.chunk_batches=8",
]


@app.command()
@_errors_to_exit_codes
def run(
    data: Annotated[Optional[Path], typer.Argument(help="dataset folder or CSV [default: synthetic demo cells]")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder [default: runs/<data name>]")] = None,
    allow_failed: AllowFailedOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """index -> split -> extract -> train -> evaluate in one go (cross-validation instead of train and evaluate
    when split.method is kfold). Without DATA: draws the synthetic demo set and
    runs it offline with MobileNetV2 (random weights) on whatever device there is."""
    overrides = list(set_ or [])
    if data is None:
        out = prepare_output_dir(out or Path("runs") / "demo", "run folder")
        data = out / "demo-data"
        overrides = DEMO_SETTINGS + overrides
        demo_data(data)
    out = prepare_output_dir(out or Path("runs") / (data.stem if data.suffix.lower() == ".csv" else data.name),
                             "run folder")
    index(data, out=out, config=config, set_=overrides)
    split(out / "manifest.parquet", config=config, set_=overrides)
    extract(out / "manifest.parquet", store=out / "features.zarr", allow_failed=allow_failed, config=config,
            set_=overrides)
    if _config(config, overrides).split.method == "kfold":
        cv(out / "features.zarr", out=out / "cv", config=config, set_=overrides)
        return
    train(out / "features.zarr", out=out / "model", overwrite=True, config=config, set_=overrides)  # run's own
    evaluate(out / "model", out / "features.zarr", split="test", out=out / "model" / "eval-test")


@app.command("demo-data")
@_errors_to_exit_codes
def demo_data(
    out: Annotated[Path, typer.Argument(help="folder to write <class>/<patient>/<image>.tif into")] = Path("demo-data"),
    patients: Annotated[int, typer.Option(min=1, help="patients per class")] = 4,
    cells: Annotated[int, typer.Option(min=1, help="cells per patient")] = 30,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Draw a small synthetic dataset (5 classes, clearly labelled synthetic) so everything runs offline."""
    from .data.synthetic import CLASSES, is_demo_folder, write_demo_dataset

    total = len(CLASSES) * patients * cells
    prepare_output_dir(out, "demo folder")
    if any(out.iterdir()) and not is_demo_folder(out):
        raise OutputError(f"demo folder {out} already holds files that are not a demo set; synthetic cells are "
                          "drawn only into a new or empty folder (or an earlier demo set)")
    with progress_bar("drawing synthetic cells", total) as (advance, _):
        n = write_demo_dataset(out, patients, cells, seed, progress=advance)
    say(f"wrote {n:,} synthetic 144x144 TIFF cells ({len(CLASSES)} classes x {patients} patients x {cells}) to {out}")


if __name__ == "__main__":
    app()
