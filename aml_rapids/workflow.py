"""The pipeline as a Python API: index -> split -> [finetune] -> extract -> train -> evaluate (or cv), and
predict.

Each stage reads its inputs, writes its outputs and a run record (``runs/<run id>-<stage>.json``) into its
folder, logs what it did to the ``aml_rapids`` logger, and returns a small result; ``run`` chains them. The CLI
and notebooks call these functions, so a notebook's run writes what ``aml-rapids run`` writes (but the log file,
which the CLI's logging session keeps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig, load_config
from .errors import ConfigError, DataError, FailedRowsError
from .logs import say, warn
from .outputs import prepare_output_dir, slug
from .progress import progress_bar
from .provenance import run_scope, write_run_record


@dataclass
class Indexed:
    manifest: Path
    rejects: Path
    cells: int
    patients: int
    classes: int
    per_class: dict[str, int]
    rejected: list[tuple[str, str]]  # (path, reason) of every file or folder refused
    skipped: int  # files that are not images, left out without a word in the manifest


@dataclass
class Splitted:
    manifest: Path
    method: str
    seed: int
    column: str
    counts: dict
    missing: dict


@dataclass
class Previewed:
    png: Path
    foreground: dict | None  # per class: share of each image the HSV mask keeps


@dataclass
class Extracted:
    store: Path
    rows_written: int
    rows_skipped: int
    rows_failed: int
    rows_appended: int
    rows_retried: int
    chunks_lost: int
    images_per_s: float
    seconds: float
    seconds_in: dict[str, float]
    store_summary: dict
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of cells that could not be read
    units: list[dict] = field(default_factory=list)  # on a Dask cluster: each unit's chunks and who wrote them


@dataclass
class Finetuned:
    folder: Path
    weights: Path  # best.pt: features.backbones[].weights loads it
    status: str  # why training stopped
    epochs_run: int
    steps: int
    best: dict  # step, epoch, val_loss, val_accuracy of the kept weights
    train_images_per_s: float
    seconds: float
    head_test: dict | None  # the fine-tuned network's own head on the test split (metrics.json)
    failed: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Trained:
    model: Path
    info: dict  # what model.json records


@dataclass
class Evaluated:
    folder: Path
    metrics: dict  # what metrics.json holds


@dataclass
class Predicted:
    folder: Path
    cells: int
    patients: int
    seen_in_training: int
    failed: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class RunResult:
    folder: Path
    stages: dict[str, object]  # stage name -> its result, in order


def as_json(result) -> dict:
    """A stage's result as JSON-ready data (paths as text), e.g. for ``--json``."""
    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result


def default_folder(source: Path) -> Path:
    """``runs/<name>`` for a dataset folder or CSV: where index and run write when not told."""
    source = Path(source)
    return Path("runs") / (source.stem if source.suffix.lower() == ".csv" else source.name)


def _failures(failures) -> list[tuple[str, str]]:
    from .data.scan import printable

    return [(printable(p.path), p.reason) for p in failures]


def check_failed(failed: list[tuple[str, str]], where: str, allow_failed: bool) -> None:
    """Name the cells whose files could not be read; unless ``allow_failed`` that is a FailedRowsError."""
    if not failed:
        return
    for path, reason in failed[:5]:
        say(f"{path}: {reason}", "  failed ", "yellow")
    message = (f"{len(failed):,} cells could not be read ({where}); a re-run retries them once their files are "
               "back or re-indexed")
    if not allow_failed:
        raise FailedRowsError(message + "; --allow-failed accepts them")
    warn(message)


def index(source: Path, out: Path | None = None, cfg: RunConfig | None = None) -> Indexed:
    """Scan a dataset folder or CSV, check every image, write manifest.parquet and rejects.csv into ``out``."""
    from .data.manifest import build_manifest, summarize, write_manifest, write_rejects
    from .data.scan import NoUsableImages

    cfg, source = cfg or RunConfig(), Path(source)
    if not source.exists():  # before any folder is made for it
        raise DataError(f"dataset {source} does not exist")
    out = prepare_output_dir(out or default_folder(source))
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
        warn(warning)
    if result.outside_root:
        warn(f"{len(result.outside_root):,} files lie outside the CSV's folder {result.manifest.root}, accepted: "
             + ", ".join(result.outside_root[:5]) + (" ..." if len(result.outside_root) > 5 else ""))
    rejected = [p for p in result.problems if not p.skipped]
    write_run_record(out, "index", cfg, source=str(source), layout=result.layout, found=result.found,
                     rejected=len(rejected), same_class_duplicates=result.same_class_duplicates,
                     outside_root=result.outside_root, **summary)
    say(f"{source} ({result.layout}), cells per class: "
        + ", ".join(f"{label} {n:,}" for label, n in summary["per_class"].items()))
    say(f"{summary['cells']:,} cells, {summary['patients']:,} patients, {summary['classes']} classes "
        f"(of {result.found:,} candidate images); {result.same_class_duplicates:,} byte-identical copies "
        f"within a class kept; {len(rejected):,} rejected, {len(result.problems) - len(rejected):,} "
        f"non-image files skipped -> {out / 'rejects.csv'}")
    if rejected:
        warn(f"{len(rejected):,} files or folders were rejected (all listed in {out / 'rejects.csv'}): "
             + "; ".join(f"{path}: {reason}" for path, reason in _failures(rejected[:5]))
             + (" ..." if len(rejected) > 5 else ""))
    say(f"manifest: {out / 'manifest.parquet'}")
    return Indexed(out / "manifest.parquet", out / "rejects.csv", summary["cells"], summary["patients"],
                   summary["classes"], summary["per_class"], _failures(rejected), len(result.problems) - len(rejected))


def split(manifest: Path, cfg: RunConfig | None = None) -> Splitted:
    """Add the configured split (or fold) column to a manifest, in place."""
    from .data.manifest import read_manifest, write_manifest
    from .data.splits import make_split

    cfg, manifest = cfg or RunConfig(), Path(manifest)
    data = read_manifest(manifest)
    result = make_split(data.table, cfg.split)
    if result.missing:
        warn(f"classes missing from parts: {result.missing}")
    data.table = result.table
    data.meta["split"] = {**cfg.split.model_dump(mode="json"), **result.record}
    write_manifest(data, manifest)
    counts = result.counts_by_class()
    write_run_record(manifest.parent, "split", cfg, manifest=str(manifest), counts=counts, missing=result.missing)
    say(result.counts.to_string())
    say(f"{cfg.split.method} split (seed {cfg.split.seed}) written to column '{result.column}' of {manifest}")
    return Splitted(manifest, cfg.split.method, cfg.split.seed, result.column, counts, result.missing)


def preview(manifest: Path, out: Path | None = None, cfg: RunConfig | None = None, per_class: int = 3,
            stats_per_class: int = 200) -> Previewed:
    """A PNG grid of what preprocessing does to a few cells per class, and the mask's foreground share."""
    from .data.manifest import read_manifest
    from .loader.preview import foreground_fractions, render_preview

    cfg, manifest = cfg or RunConfig(), Path(manifest)
    data = read_manifest(manifest)
    png = prepare_output_dir(out or manifest.parent) / "preview.png"
    render_preview(data.table, data.root, cfg, png, per_class)
    stats = foreground_fractions(data.table, data.root, cfg, stats_per_class) if stats_per_class else None
    foreground = None if stats is None else stats.round(4).to_dict(orient="index")
    if stats is not None:
        say("foreground fraction kept by the HSV mask, per class:\n" + stats.round(3).to_string())
    write_run_record(png.parent, "preview", cfg, manifest=str(manifest), png=str(png), foreground=foreground)
    say(f"preview: {png}")
    return Previewed(png, foreground)


def extract(manifest: Path, store: Path | None = None, cfg: RunConfig | None = None,
            allow_failed: bool = False) -> Extracted:
    """Extract every configured backbone's features into a Zarr store (resuming, retrying, appending)."""
    from .data.manifest import read_manifest
    from .features.extract import extract as run_extract
    from .features.store import FeatureStore

    cfg, manifest = cfg or RunConfig(), Path(manifest)
    data = read_manifest(manifest)
    store = Path(store or manifest.parent / "features.zarr")
    prepare_output_dir(manifest.parent / "runs", "run record folder (beside the manifest)")  # before the work
    with progress_bar(f"extracting {', '.join(b.name for b in cfg.features.backbones)}") as (advance, set_total):
        summary = run_extract(data, store, cfg, progress=advance, on_total=set_total)
    totals = FeatureStore.open(store).summary()
    result = Extracted(store, summary.rows_written, summary.rows_skipped, summary.rows_failed,
                       summary.rows_appended, summary.rows_retried, summary.chunks_lost, summary.images_per_s,
                       summary.seconds, summary.seconds_in, totals, _failures(summary.failures), summary.units)
    write_run_record(manifest.parent, "extract", cfg, manifest=str(manifest),
                     interrupted_writer=summary.interrupted_writer, **as_json(result))
    if summary.interrupted_writer:
        warn(f"an earlier writer of {store} ended without finishing ({summary.interrupted_writer}); its work "
             "was checked and completed")
    if summary.rows_retried:
        say(f"retried {summary.rows_retried:,} rows that had failed before")
    if summary.chunks_lost:
        warn(f"{summary.chunks_lost:,} chunks marked done had lost their files; computed again")
    say(f"{summary.rows_written:,} rows written, {summary.rows_skipped:,} already done (skipped), "
        f"{summary.rows_failed:,} failed, {summary.rows_appended:,} new rows appended; "
        f"{summary.images_per_s:,.0f} images/s over {summary.seconds:.1f} s")
    workers = len({u["worker"] for u in summary.units})
    where = f" (summed over the units of {workers} worker{'s' if workers > 1 else ''})" if summary.units else ""
    say(f"time in{where}: " + ", ".join(f"{part} {seconds:.1f} s" for part, seconds in summary.seconds_in.items()))
    say(f"store: {store} ({totals['ok']:,} of {totals['rows'] - totals['padding']:,} rows ready)")
    check_failed(result.failed, f"listed in {store / 'rows' / 'status'} as failed", allow_failed)
    return result


def finetune(manifest: Path, out: Path | None = None, cfg: RunConfig | None = None, overwrite: bool = False,
             allow_failed: bool = False) -> Finetuned:
    """Fine-tune ``finetune.backbone`` with a new head on the manifest's train split (resuming a killed run from
    its last checkpoint); its best weights then extract features like any other weights file."""
    from .data.manifest import read_manifest
    from .finetune.train import finetune as run_finetune

    cfg, manifest = cfg or RunConfig(), Path(manifest)
    data = read_manifest(manifest)
    out = Path(out or manifest.parent / f"finetune-{slug(cfg.finetune.backbone)}")
    ft = cfg.finetune
    say(f"fine-tuning {ft.backbone} from weights {ft.weights}: Adam lr {ft.lr:g}, batch {ft.batch_size}, at most "
        f"{ft.epochs} epochs, validation every {ft.val_every} steps")
    with progress_bar(f"fine-tuning {ft.backbone}") as (advance, set_total):
        summary = run_finetune(data, manifest, out, cfg, overwrite, progress=advance, on_total=set_total)
    result = Finetuned(out, out / "best.pt", summary.status, summary.epochs_run, summary.steps, summary.best,
                       summary.train_images_per_s, summary.seconds, summary.head_test, _failures(summary.failed))
    write_run_record(out, "finetune", cfg, manifest=str(manifest), **as_json(result))
    best = summary.best
    say(f"{summary.status}; {summary.steps:,} steps, {summary.train_images_per_s:,.1f} training images/s")
    if best["step"] is not None:
        say(f"best validation loss {best['val_loss']:.4f} (accuracy {best['val_accuracy']:.4f}) at step "
            f"{best['step']:,}, epoch {best['epoch']}: {result.weights}")
    if summary.head_test:
        for line in report_lines(summary.head_test, "the fine-tuned head on the test split"):
            say(line)
    say(f"extract with it: --set 'features.backbones=[{{name: {ft.backbone}, weights: {result.weights}}}]'")
    check_failed(result.failed, f"listed in {out / 'finetune.json'}", allow_failed)
    return result


LEVELS = ("cell", "patient")


@contextmanager
def _classifier_fits(cfg: RunConfig, level: str) -> Iterator[RunConfig]:
    """Where the stacking classifier's fits run: in this process, or on the Dask cluster of ``scale`` (the
    config yielded then gives the fits the cluster's threads)."""
    if cfg.scale.cluster == "none":
        yield cfg
        return
    if level == "patient":
        warn(f"scale.cluster={cfg.scale.cluster} is for extraction and the cell-level classifier; the patient-level "
             "model trains in this process")
        yield cfg
        return
    from .scale.cluster import dask_client
    from .scale.fits import fits_on

    with dask_client(cfg.scale) as client, fits_on(client, cfg) as on_cluster:
        yield on_cluster


def check_level(level: str) -> None:
    if level not in LEVELS:
        raise ConfigError(f"unknown level {level!r}; use cell (the stacking classifier) or patient (attention MIL)")


def train(store: Path, out: Path, cfg: RunConfig | None = None, overwrite: bool = False,
          level: str = "cell") -> Trained:
    """Fit the stacking classifier on the store's training rows (``level`` cell), or the attention MIL model on
    its training patients (``patient``), into a new (or, ``overwrite``, its own) folder."""
    check_level(level)
    cfg = cfg or RunConfig()
    if level == "patient":
        from .patients.train import train as run_train

        say(f"training: attention MIL ({cfg.patients.attention}) over each patient's cells (row z-score, PCA)")
    else:
        from .classify.train import train as run_train

        say("training: z-score, PCA, out-of-fold SVM + random forest, meta-learner")
    with _classifier_fits(cfg, level) as fit_cfg:
        info = run_train(Path(store), fit_cfg, Path(out), overwrite=overwrite)
    write_run_record(out, "train", cfg, model=info)
    if level == "patient":
        say(f"{len(info['members'])} network(s), stopped early on {info['validation']}; epochs kept (lowest "
            f"validation loss): {', '.join(str(m['best_epoch']) for m in info['members'])}")
        say(f"trained on {info['training_patients']:,} patients ({info['backend']}), classes {info['classes']}; "
            f"model: {out}")
    else:
        say(f"trained on {info['training_rows']:,} rows ({info['backend']}), classes {info['classes']}; model: {out}")
    say("time in: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in info["fit_seconds"].items()))
    return Trained(Path(out), info)


def report_lines(report: dict, title: str) -> list[str]:
    """What was evaluated, then one line per level (cells; patients where there are some): accuracy, macro AUC
    and macro F1, each with its bootstrap 95% interval."""
    from .evaluate.report import weights_words

    backbones = ", ".join(f"{name} ({weights_words(b)})"
                          for name, b in report["backbones"].items())
    lines = [f"{title} ({report['split_protocol']}), backbones {backbones}:"]
    levels = [("cells", report.get("cell_level")), ("patients", report.get("patient_level"))]
    levels += [(f"cells of {cohort}", level) for cohort, level in report.get("by_cohort", {}).items()]
    for name, level in levels:
        if level is None:
            continue
        parts = []
        for label, value, ci in (("accuracy", level["accuracy"], "accuracy"),
                                 ("macro AUC", level["macro_auc"], "macro_auc"),
                                 ("macro F1", level["macro"]["f1"], "macro_f1")):
            interval = level["ci95"].get(ci)
            parts.append(f"{label} undefined" if value is None else f"{label} {value:.3f}"
                         + (f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})" if interval else ""))
        lines.append(f"  {name}: {', '.join(parts)}, n={level['n']:,}")
    return lines


def evaluate(model: Path, store: Path, split: str = "test", out: Path | None = None,
             cfg: RunConfig | None = None) -> Evaluated:
    """Metrics, plots and per-cell predictions of a model on one split of a store (never its training rows)."""
    from .classify.io import read_info
    from .classify.data import select_rows
    from .classify.train import check_evaluable, evaluate as evaluate_cells
    from .features.store import FeatureStore
    from .patients.train import LEVEL, evaluate as evaluate_patients

    cfg, model = cfg or RunConfig(), Path(model)
    check_evaluable(split)  # before its folder is made, as are the model and the store
    run_evaluate = evaluate_patients if read_info(model).get("level") == LEVEL else evaluate_cells
    select_rows(FeatureStore.open(store), (split,))  # a split the store lacks is refused before the folder is made
    out = prepare_output_dir(out or model / f"eval-{split}", "report folder")
    report = run_evaluate(model, Path(store), split, out, cfg.evaluate)
    write_run_record(out, "evaluate", cfg, model=str(model), store=str(store), split=split,
                     warnings=report["warnings"])
    for warning in report["warnings"]:
        warn(warning)
    for line in report_lines(report, f"{split} split"):
        say(line)
    say(f"report: {out / 'metrics.json'}, per-cell predictions: {out / 'predictions.csv'}, plots: {out}")
    return Evaluated(out, report)


def cross_validate(store: Path, out: Path | None = None, cfg: RunConfig | None = None,
                   level: str = "cell") -> Evaluated:
    """Patient-grouped k-fold cross-validation on a store of a ``kfold`` manifest: pooled out-of-fold report of
    the stacking classifier (``level`` cell), or attention MIL against pooled cell scores (``patient``)."""
    from .classify.crossval import cross_validate as run_cv
    from .features.store import FeatureStore

    check_level(level)
    cfg, store = cfg or RunConfig(), Path(store)
    FeatureStore.open(store)  # before its report folder is made
    out = prepare_output_dir(out or store.parent / ("cv" if level == "cell" else "cv-patients"), "report folder")
    if level == "patient":
        return _compare_patient_models(store, out, cfg)

    def show(fold: dict) -> None:
        say(f"fold {fold['fold']}: {fold['cells']:,} cells, cell AUC {fold['cell_macro_auc']:.3f}"
            + (f", patient AUC {fold['patient_macro_auc']:.3f} (n={fold['patients']})"
               if fold.get("patient_macro_auc") is not None else ""))

    say("cross-validating: one stacking classifier per fold")
    with _classifier_fits(cfg, level) as fit_cfg:
        report = run_cv(store, fit_cfg, out, on_fold=show)
    write_run_record(out, "cv", cfg, store=str(store), folds=report["folds"], warnings=report["warnings"])
    for warning in report["warnings"]:
        warn(warning)
    for line in report_lines(report, report["split"]):
        say(line)
    say(f"report: {out / 'metrics.json'}, out-of-fold predictions: {out / 'predictions.csv'}")
    return Evaluated(out, report)


def _compare_patient_models(store: Path, out: Path, cfg: RunConfig) -> Evaluated:
    from .patients.crossval import compare

    def show(fold: dict) -> None:
        say(f"fold {fold['fold']}: {fold['patients']} patients, macro AUC " + ", ".join(
            f"{key.removesuffix(' macro AUC')} {value:.3f}" for key, value in fold.items()
            if key.endswith("macro AUC") and value is not None))

    say("cross-validating at patient level: per fold, the stacking classifier (pooled cell scores) and attention "
        "MIL on the same patients")
    report = compare(store, cfg, out, on_fold=show)
    write_run_record(out, "cv", cfg, store=str(store), level="patient", folds=report["folds"])
    say(f"{report['split']} ({report['split_protocol']}), {report['bags']['patients']} patients, "
        f"{report['bags']['cells']:,} cells:")
    for name, level in report["models"].items():
        interval = level["ci95"].get("macro_auc")
        say(f"  {name}: macro AUC " + ("undefined" if level["macro_auc"] is None else f"{level['macro_auc']:.3f}")
            + (f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})" if interval else "")
            + f", accuracy {level['accuracy']:.3f}")
    say(f"report: {out / 'metrics.json'}, per-patient scores: {out / 'patients.csv'}, attention: "
        f"{out / 'attention.csv'}")
    return Evaluated(out, report)


def predict(model: Path, source: Path, out: Path | None = None, overrides: list[str] | None = None,
            overwrite: bool = False, allow_failed: bool = False, check_drift: bool = True) -> Predicted:
    """Class probabilities per cell and per patient for new images (or a store), extracted as the model's; with
    ``check_drift``, the cells compared with the model's training store (drift.json)."""
    from .classify.predict import predict as run_predict

    model, source = Path(model), Path(source)
    out = Path(out or model / f"predict-{source.stem}")
    with progress_bar(f"extracting {source}") as (advance, set_total):
        result = run_predict(model, source, out, overrides, overwrite, progress=advance, on_total=set_total,
                             check_drift=check_drift)
    done = Predicted(out, len(result.cells), len(result.patients), result.seen_in_training,
                     _failures(result.failures))
    write_run_record(out, "predict", result.config or load_config(None), source=str(source), model=str(model),
                     overrides=overrides, drift=result.drift and result.drift.to_json(), **as_json(done))
    for warning in result.warnings:
        warn(warning)
    if result.seen_in_training:
        warn(f"{result.seen_in_training:,} of these cells were in the model's training set (column in_training "
             "of predictions.csv): their predictions say nothing about new cells")
    say(f"{done.cells:,} cells, {done.patients:,} patients predicted: {out / 'predictions.csv'}, "
        f"{out / 'patients.csv'}")
    if result.drift is not None:
        _report_drift(result.drift, "the model's training store", out / "drift.json")
    check_failed(done.failed, f"listed in {out / 'failed.csv'}", allow_failed)
    return done


def demo_data(out: Path, patients: int = 4, cells: int = 30, seed: int = 0) -> Path:
    """Draw a small synthetic dataset (5 classes, labelled synthetic) into a new, empty or earlier demo folder."""
    from .data.synthetic import CLASSES, is_demo_folder, write_demo_dataset
    from .errors import OutputError

    out = prepare_output_dir(out, "demo folder")
    if any(out.iterdir()) and not is_demo_folder(out):
        raise OutputError(f"demo folder {out} already holds files that are not a demo set; synthetic cells are "
                          "drawn only into a new or empty folder (or an earlier demo set)")
    with progress_bar("drawing synthetic cells", len(CLASSES) * patients * cells) as (advance, _):
        n = write_demo_dataset(out, patients, cells, seed, progress=advance)
    say(f"wrote {n:,} synthetic 144x144 TIFF cells ({len(CLASSES)} classes x {patients} patients x {cells}) to {out}")
    return out


DEMO_SETTINGS = [
    # Offline on a CPU: MobileNetV2 alone, without pretrained weights (none can be downloaded offline); its random
    # features are ~1e-8 in size, below float16's range, hence float32 storage.
    "features.backbones=[{name: mobilenet_v2, weights: none}]", "features.store_dtype=float32",
    "loader.batch_size=64", "features.chunk_batches=8",
]


def run(data: Path | None = None, out: Path | None = None, config: Path | RunConfig | None = None,
        overrides: list[str] | None = None, allow_failed: bool = False) -> RunResult:
    """index -> split -> extract -> train -> evaluate into one folder (cross-validation instead of train and
    evaluate when split.method is kfold). Without ``data``: the synthetic demo set, offline, with MobileNetV2
    (random weights). ``config``: a YAML file or a RunConfig; ``overrides``: ``section.key=value`` items."""
    with run_scope():
        return _run(data, out, config, list(overrides or []), allow_failed)


def _run(data: Path | None, out: Path | None, config: Path | RunConfig | None, overrides: list[str],
         allow_failed: bool) -> RunResult:
    if data is None:
        out = prepare_output_dir(out or Path("runs") / "demo", "run folder")
        data = demo_data(out / "demo-data")
        overrides = DEMO_SETTINGS + overrides
    out = prepare_output_dir(out or default_folder(data), "run folder")
    if isinstance(config, RunConfig):
        cfg = load_config(None, overrides, base=config.model_dump(mode="json"))
    else:
        cfg = load_config(config, overrides)
    stages: dict[str, object] = {"index": index(data, out, cfg)}
    stages["split"] = split(out / "manifest.parquet", cfg)
    with _one_cluster(cfg):
        stages["extract"] = extract(out / "manifest.parquet", out / "features.zarr", cfg, allow_failed)
        if cfg.split.method == "kfold":
            stages["cv"] = cross_validate(out / "features.zarr", out / "cv", cfg)
        else:
            stages["train"] = train(out / "features.zarr", out / "model", cfg, overwrite=True)  # the run's own
            if cfg.split.method == "all":
                say("split.method all: every cell trained on, so nothing is left to evaluate")
                return RunResult(out, stages)
            stages["evaluate"] = evaluate(out / "model", out / "features.zarr", "test", out / "model" / "eval-test",
                                          cfg)
    return RunResult(out, stages)


@contextmanager
def _one_cluster(cfg: RunConfig) -> Iterator[None]:
    """The Dask cluster of ``scale`` (if any) started once for every stage of a run, not once per stage."""
    if cfg.scale.cluster == "none":
        yield
        return
    from .scale.cluster import dask_client

    with dask_client(cfg.scale):
        yield


@dataclass
class Drifted:
    folder: Path
    flagged: bool
    threshold: float  # a domain AUROC at or above it flags drift
    auroc: dict[str, float]  # per backbone, the domain classifier's
    notes: list[str]  # what the numbers rest on (fewer folds, missing images)


def _report_drift(result, against: str, where: Path) -> None:
    """One line of a ``cohorts.drift.Drift``: flagged (a warning) or not, with the highest AUROC and its backbone."""
    backbone, auroc = result.worst
    line = (f"the domain AUROC against {against} reaches {auroc:.3f} ({backbone}); drift is flagged at >= "
            f"{result.threshold:g}: {where}")
    if not result.judged:
        warn(f"drift not judged: {result.notes[0]}: {where}")
    elif result.flagged:
        warn(f"DRIFT FLAGGED: {line}. These cells look unlike those the numbers were measured on; predictions "
             "on them may be worse than the model's test results say")
    else:
        say(f"no drift flagged: {line}")


def drift(reference: Path, new: Path, out: Path | None = None, cfg: RunConfig | None = None,
          model: Path | None = None) -> Drifted:
    """Whether the new store's cohort looks unlike the reference store's (docs/drift.md): per backbone a domain
    classifier's AUROC (flags drift) and an MMD test, the colour of the cells, and with ``model`` (a cell-level
    model folder) its predicted class mix in each; drift.json and drift.png in ``out`` (default: ``drift``
    beside the new store)."""
    from .cohorts.drift import class_mix, comparable_backbones, measure_drift, write_drift
    from .cohorts.plots import plot_drift
    from .features.store import FeatureStore

    cfg = cfg or RunConfig()
    stores = FeatureStore.open(reference), FeatureStore.open(new)
    backbones = comparable_backbones(*stores)  # refused before any folder is made, as is the model
    loaded = _drift_model(Path(model), stores) if model is not None else None
    out = prepare_output_dir(out or Path(new).parent / "drift", "drift folder")
    say(f"drift of {new} against {reference}: {', '.join(backbones)}")
    mix = None
    if loaded is not None:
        classifier, info = loaded
        mix = class_mix(classifier, info, Path(model), *stores, cfg.drift)
    result = measure_drift(*stores, cfg.drift, backbones, mix)
    plot_drift(result, out / "drift.png")
    write_run_record(out, "drift", cfg, reference=str(reference), new=str(new), model=model and str(model),
                     drift=result.to_json())
    write_drift(result, out)  # last: a drift.json stands for a finished check
    for name, b in result.backbones.items():
        say(f"{name}: domain AUROC {b.auroc:.3f} ({b.folds} grouped folds, {b.cells['reference']:,} and "
            f"{b.cells['new']:,} cells), MMD² {b.mmd2:.4f} (p {b.mmd_p:.3g})")
    if mix is not None:
        say(f"predicted class mix: total-variation distance {mix.total_variation:.3f}; reference "
            + ", ".join(f"{c} {share:.0%}" for c, share in mix.reference.items()) + "; new "
            + ", ".join(f"{c} {share:.0%}" for c, share in mix.new.items()))
    if result.colour.difference:
        say("colour of the segmented cells, new minus reference: "
            + ", ".join(f"{name} {value:+.3g}" for name, value in result.colour.difference.items()))
    for note in result.notes:
        say(f"note: {note}")
    _report_drift(result, str(reference), out / "drift.json")
    return Drifted(out, result.flagged, result.threshold, {n: b.auroc for n, b in result.backbones.items()},
                   result.notes)


def _drift_model(model: Path, stores) -> tuple:
    """A cell-level model and its info, refused unless both stores hold its features."""
    from .classify.io import check_store_matches, load_model

    classifier, info = load_model(model)
    if info.get("level") == "patient":
        raise ConfigError(f"model {model} is a patient-level model; drift --model compares the class mix a cell-level "
                          "model (`aml-rapids train`, --level cell) predicts")
    for store in stores:
        check_store_matches(info, store)
    return classifier, info
