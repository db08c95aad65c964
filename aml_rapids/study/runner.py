"""Run a study: index and split once, then every variant (extract, train, evaluate; or cross-validate), then
compare them on the same cells.

    DIR/manifest.parquet          the cells and their split, shared by every variant
    DIR/stores/<key>/features.zarr  one store per extraction config: variants that differ only in the classifier
                                  share one, so they never extract again
    DIR/variants/<name>-<hash>/   each variant's model and report (eval-test/ or cv/; a fine-tuned head's
                                  finetune/ with its eval-test/) and variant.json
    DIR/results.csv, results.md, mcnemar.csv, roc.png, roc.svg, study.json

A variant is done once its ``variant.json`` is written, so a study killed midway resumes with the variants
already done (and a store half-extracted resumes where it stopped). A variant that fails is reported and the
others go on; the study then exits with the failures named.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import workflow
from ..config import RunConfig, as_overrides, load_config
from ..data.manifest import read_manifest
from ..finetune.train import EVAL as FINETUNE_EVAL
from ..loader.augment import augment_identity
from ..errors import AmlRapidsError, ConfigError, DataError, VariantsFailed
from ..logs import say, warn
from ..outputs import atomic_write_text, prepare_output_dir, read_json
from ..provenance import write_run_record
from .compare import COMPARISON_FILES, read_variant, write_comparison
from .spec import StudySpec, Variant, read_spec, variant_config

STUDY_FILE = "study.json"


@dataclass
class StudyResult:
    folder: Path
    done: list[str]  # variants with results, in the study's order
    failed: dict[str, str] = field(default_factory=dict)  # variant -> why
    extractions: int = 0  # stores this run wrote rows into
    comparison: dict | None = None  # the results table and McNemar's tests, as written


def store_key(cfg: RunConfig) -> str:
    """What decides a store's features (the settings ``extract`` checks a store against), as a short digest:
    variants with the same key share one store."""
    f, loader = cfg.features, cfg.loader
    decides = {"backbones": [b.model_dump() for b in f.backbones], "seed": f.seed, "dtype": f.store_dtype,
               "chunk_rows": cfg.chunk_rows, "image_size": loader.image_size, "loader_seed": loader.seed,
               "segmentation": cfg.segmentation.model_dump(), "augment": augment_identity(cfg.augment),
               "oversample": cfg.oversample.model_dump()}
    if cfg.stain_norm.method != "none":
        decides["stain_norm"] = cfg.stain_norm.model_dump()
    return hashlib.sha256(json.dumps(decides, sort_keys=True, default=str).encode()).hexdigest()[:12]


def slug(name: str) -> str:
    """A folder name any file system takes, still readable, and unique per name."""
    readable = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._")[:48] or "study"
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def variant_folder(out: Path, name: str) -> Path:
    return out / "variants" / slug(name)


def _base_digest(base: RunConfig) -> str:
    return hashlib.sha256(json.dumps(base.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _claim_folder(out: Path, spec: StudySpec, data: Path | None, base: RunConfig) -> Path:
    """A study folder belongs to one study (by name), one dataset and one base config: all recorded before any
    work, checked on every later run (so no resumed study pairs variants made with two bases). Returns the data."""
    record = out / STUDY_FILE
    if record.exists():
        held = read_json(record)
        if held.get("name") != spec.name:
            raise ConfigError(f"study folder {out} holds study {held.get('name')!r}, not {spec.name!r}; use a new "
                              "folder for another study")
        if data is not None and held["data"] != str(Path(data).resolve()):
            raise ConfigError(f"study folder {out} was made from {held['data']}, not {data}; use a new folder")
        if held.get("base") != _base_digest(base):
            raise ConfigError(f"study folder {out} was made with other base settings (the study's config or set, or "
                              "--set); variants made with two bases cannot be compared: use a new folder")
        return Path(held["data"])
    if any(out.iterdir()):
        raise ConfigError(f"study folder {out} is not empty and holds no {STUDY_FILE}; use a new or empty folder")
    if data is None:
        raise ConfigError("a new study needs its data: aml-rapids study STUDY.yaml DATA")
    atomic_write_text(record, json.dumps({"name": spec.name, "description": spec.description,
                                          "data": str(Path(data).resolve()), "base": _base_digest(base),
                                          "reference": spec.reference,
                                          "variants": [v.model_dump() for v in spec.expand()]},
                                         indent=2, default=str))
    return Path(data)


def _run_variant(variant: Variant, cfg: RunConfig, manifest: Path, out: Path) -> tuple[Path, int]:
    """Extract (or reuse the store), then train + evaluate on test, or cross-validate; or fine-tune (resuming)
    and take the head's own test report. Returns the report folder and the rows written to a store."""
    folder = variant_folder(out, variant.name)
    if variant.head:
        if "test" not in set(read_manifest(manifest).table.get("split", [])):  # before any training
            raise ConfigError(f"variant {variant.name!r}: the fine-tuned head is judged on the test split, and "
                              f"{manifest} has none")
        tuned = workflow.finetune(manifest, folder / "finetune", cfg)
        store, report, written = None, tuned.folder / FINETUNE_EVAL, 0
    else:
        store = out / "stores" / store_key(cfg) / "features.zarr"
        written = workflow.extract(manifest, store, cfg).rows_written
        if cfg.split.method == "kfold":
            report = workflow.cross_validate(store, folder / "cv", cfg).folder
        else:
            trained = workflow.train(store, folder / "model", cfg, overwrite=True)
            report = workflow.evaluate(trained.model, store, "test", folder / "model" / "eval-test", cfg).folder
    atomic_write_text(folder / "variant.json", json.dumps(  # paths within the study folder, which may move
        {"name": variant.name, "set": variant.set, "head": variant.head,
         "store": None if store is None else str(store.relative_to(out)), "report": str(report.relative_to(out))},
        indent=2, default=str))
    return report, written


def _done(variant: Variant, out: Path) -> Path | None:
    """The report folder of a variant finished earlier with the same overrides; None if it has not run."""
    record = variant_folder(out, variant.name) / "variant.json"
    if not record.exists():
        return None
    held = read_json(record)
    if held["set"] != json.loads(json.dumps(variant.set, default=str)) or held.get("head", False) != variant.head:
        raise ConfigError(f"variant {variant.name!r} in {out} was run otherwise (overrides {held['set']}, head "
                          f"{held.get('head', False)}); rename the variant, or use a new study folder")
    return out / held["report"]


def run_study(spec_path: Path, out: Path, data: Path | None = None, overrides: list[str] | None = None,
              allow_failed: bool = False) -> StudyResult:
    """Run every variant of the study file that has not run yet into ``out``, then compare them all; failed
    variants raise VariantsFailed at the end, unless ``allow_failed`` (then they are only named)."""
    spec = read_spec(spec_path)
    variants = spec.expand()
    configs = {v.name: variant_config(spec, v, overrides) for v in variants}  # every key checked before any work
    heads = [v.name for v in variants if v.head and configs[v.name].split.method == "kfold"]
    if heads:
        raise ConfigError(f"variant {heads[0]!r} is a fine-tuned head, judged on a test split, and a k-fold study has "
                          "none (fine-tuning inside every fold is not built)")
    out = prepare_output_dir(out, "study folder")
    base = load_config(spec.config, as_overrides(spec.set) + list(overrides or []))
    data = _claim_folder(out, spec, data, base)
    manifest = out / "manifest.parquet"
    if not manifest.exists():  # index and split again after a run that stopped before they were done
        workflow.index(data, out, base)
    if read_manifest(manifest).meta.get("split") is None:
        workflow.split(manifest, base)
    result = StudyResult(out, [])
    reports: dict[str, Path] = {}
    for k, variant in enumerate(variants, 1):
        earlier = _done(variant, out)
        if earlier is not None:
            say(f"variant {k}/{len(variants)} {variant.name}: done earlier, kept")
            reports[variant.name] = earlier
            continue
        say(f"variant {k}/{len(variants)} {variant.name}: {' '.join(as_overrides(variant.set)) or 'the base config'}")
        try:
            reports[variant.name], written = _run_variant(variant, configs[variant.name], manifest, out)
            result.extractions += written > 0
        except AmlRapidsError as exc:
            result.failed[variant.name] = str(exc)
            warn(f"variant {variant.name} failed, the others go on: {exc}")
    result.done = [v.name for v in variants if v.name in reports]
    if spec.reference in reports and len(reports) > 1:
        results = [read_variant(name, reports[name]) for name in result.done]
        where = "out-of-fold, every cell" if base.split.method == "kfold" else "test split"
        title = f"{spec.name}: {results[0].metrics['split_protocol']}, {where}"
        result.comparison = write_comparison(results, spec.reference, out, title)
        say(f"results: {out / 'results.md'}, McNemar's tests: {out / 'mcnemar.csv'}, ROC curves: {out / 'roc.png'}")
    else:
        stale = [name for name in COMPARISON_FILES if (out / name).exists()]
        for name in stale:  # an earlier run's comparison would read as this run's
            (out / name).unlink()
        why = (f"the reference variant {spec.reference} has no results" if spec.reference not in reports
               else "only the reference variant has results")
        warn(f"{why}, so nothing is compared" + (f"; the earlier comparison ({', '.join(stale)}) was removed"
                                                 if stale else ""))
    write_run_record(out, "study", base, study=str(spec_path), done=result.done, failed=result.failed,
                     extractions=result.extractions)
    if result.failed:
        message = (f"{len(result.failed)} of {len(variants)} variants failed ("
                   + "; ".join(f"{n}: {why}" for n, why in result.failed.items())
                   + f"); the others' results are in {out}")
        if not allow_failed:
            raise VariantsFailed(message)
        warn(message)
    if not result.done:
        raise DataError(f"no variant of {spec_path} has results")
    return result
