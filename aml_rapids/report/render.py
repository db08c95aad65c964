"""Render a run or study folder into ``report.html``: metrics, plots (embedded, so the page travels alone),
tables, the config, provenance and each stage's time and throughput. It reads what the stages wrote (JSON, CSV,
PNG, YAML) and computes nothing, so the page always shows exactly the numbers in the files beside it.
"""

from __future__ import annotations

import base64
import datetime as _dt
from pathlib import Path

import jinja2
import pandas as pd

from .. import __version__
from ..errors import DataError
from ..evaluate.report import weights_words
from ..outputs import atomic_write_text, read_json
from ..provenance import run_records
from ..study.compare import summary_table

REPORT = "report.html"
PLOTS = ("confusion.png", "roc.png", "roc_patients.png")


def _image(path: Path) -> dict:
    return {"name": path.name, "data": base64.b64encode(path.read_bytes()).decode("ascii")}


def _table(table: pd.DataFrame) -> str:
    """A table as HTML (numbers to three significant digits)."""
    return table.to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0, na_rep="")


def _csv(path: Path) -> pd.DataFrame:
    """A study table as written: names stay text (a variant called NA or 1e-3 is a name, not a number)."""
    return pd.read_csv(path, dtype={"variant": str, "reference": str, "level": str, "test": str},
                       keep_default_na=False, na_values=[""])


def _evaluation(folder: Path, root: Path) -> dict:
    """One evaluation folder (metrics.json and its plots), as the template shows it."""
    metrics = read_json(folder / "metrics.json")
    shown = [(label, metrics[key]) for key, label in (("cell_level", "cells"), ("patient_level", "patients"))
             if key in metrics]
    shown += [(f"patients, {name}", level) for name, level in metrics.get("models", {}).items()]  # cv --level patient
    shown += [(f"cells of {cohort}", level) for cohort, level in metrics.get("by_cohort", {}).items()]
    levels = [{"label": label, "n": level["n"], "ci95": level["ci95"], "accuracy": level["accuracy"],
               "macro_auc": level["macro_auc"], "macro": level["macro"], "per_class": level["per_class"],
               "auc": level["auc"]} for label, level in shown]
    return {"title": str(folder.relative_to(root)), "metrics": metrics, "levels": levels,
            "plots": [_image(folder / name) for name in PLOTS if (folder / name).is_file()]}


def _per_class(summary: dict) -> str:
    """A Grad-CAM or occlusion summary's numbers, a row per class and one for all cells."""
    rows = [{"class": name, **numbers} for name, numbers in {**summary["per_class"], "all": summary["all"]}.items()]
    return _table(pd.DataFrame(rows))


def _map_folder(summary_path: Path, root: Path) -> dict:
    summary = read_json(summary_path)
    folder = summary_path.parent
    if "layer" in summary:
        about = (f"Grad-CAM of {summary['backbone']} at {summary['layer']} through {summary['head']}; weights "
                 f"{summary['weights_words']} ({summary['weights']})")
    else:
        about = (f"occlusion of the hybrid ({', '.join(summary['backbones'])}; {summary['window']} px square, "
                 f"stride {summary['stride']}); weights {summary['weights']}")
    about += f"; cells of {summary.get('split', 'the Grad-CAM run')} ({summary['split_protocol']}), target {summary['target']}"
    plots = [_image(png) for png in (folder / "gradcam.png", folder / "occlusion.png") if png.is_file()]
    return {"title": str(folder.relative_to(root)), "about": about, "table": _per_class(summary), "plots": plots}


def _drift_folder(path: Path, root: Path) -> dict:
    """A drift check (drift.json, drift.png): each backbone's domain AUROC and MMD test, and the verdict."""
    drift = read_json(path)
    table = pd.DataFrame([{"backbone": name, "domain AUROC": b["auroc"], "folds": b["folds"], "MMD²": b["mmd2"],
                           "MMD p": b["mmd_p"]} for name, b in drift["backbones"].items()])
    verdict = ("FLAGGED" if drift["flagged"] else "not flagged" if drift.get("judged", True)
               else "not judged (too few cells)")
    about = (f"drift of {', '.join(drift['new']['cohorts'])} against {', '.join(drift['reference']['cohorts'])}: "
             f"{verdict} (domain AUROC threshold {drift['threshold']})")
    return {"title": str(path.parent.relative_to(root)), "about": about, "table": _table(table),
            "plots": [_image(path.parent / "drift.png")] if (path.parent / "drift.png").is_file() else []}


def _explanations(folder: Path) -> list[dict]:
    """The Grad-CAM, occlusion, embedding and gallery folders below ``folder``: what each shows, its numbers
    and its pictures, as their commands wrote them."""
    found = [_map_folder(path, folder) for path in sorted(folder.rglob("summary.json"))
             if (path.parent / "maps.npy").is_file()]
    for path in sorted(folder.rglob("embed.json")):
        embedded = read_json(path)
        table = pd.DataFrame([{"space": space, **{k: v for k, v in numbers.items() if k != "files"}}
                              for space, numbers in embedded["spaces"].items()])
        found.append({"title": str(path.parent.relative_to(folder)), "table": _table(table),
                      "about": f"{embedded['method']} of {embedded['rows']:,} cells of store {embedded['store']} "
                               f"({embedded['split_protocol']}), on {embedded['backend']}",
                      "plots": [_image(path.parent / name) for numbers in embedded["spaces"].values()
                                for name in numbers["files"] if name.endswith(".png")]})
    for path in sorted(folder.rglob("drift.json")):
        found.append(_drift_folder(path, folder))
    for path in sorted(folder.rglob("gallery.csv")):
        found.append({"title": str(path.parent.relative_to(folder)), "table": None,
                      "about": "the most confident correct and wrong cells per class, and each patient's top cells",
                      "plots": [_image(png) for png in (path.parent / "classes.png", path.parent / "patients.png")
                                if png.is_file()]})
    return found


def _stages(folders: list[Path], root: Path) -> list[dict]:
    """Every run record in these folders, oldest first: stage, run id, time, commit, and its seconds and rate."""
    rows = []
    for folder in folders:
        for record in run_records(folder):
            details = record.get("details", {})
            seconds = details.get("seconds")  # extract's; train's is the sum of its fit's phases
            if record["stage"] == "train":
                seconds = sum(details["model"].get("fit_seconds", {}).values())
            rows.append({"stage": record["stage"], "run_id": record.get("run_id", ""), "time": record["time_utc"],
                         "commit": (record.get("git_commit") or "")[:10], "seconds": seconds or None,
                         "rate": details.get("images_per_s"), "folder": str(folder.relative_to(root)),
                         "machine": record["machine"], "versions": record["versions"]})
    return sorted(rows, key=lambda r: r["time"])


def _variant_position(report: Path, root: Path, study: dict | None) -> int:
    """Where a report's variant stands in the study file (a run's evaluations: all at 0)."""
    if study is None:
        return 0
    names = [v["name"] for v in study["variants"]]
    record = next((p / "variant.json" for p in report.parents if (p / "variant.json").is_file()), None)
    name = read_json(record)["name"] if record else None
    return names.index(name) if name in names else len(names)


def render_report(folder: Path) -> Path:
    """Write ``folder/report.html`` for a run folder (``aml-rapids run``) or a study folder (``aml-rapids study``)."""
    folder = Path(folder)
    study = read_json(folder / "study.json") if (folder / "study.json").is_file() else None
    evaluations = sorted((p.parent for p in folder.rglob("metrics.json") if p.parent != folder),
                         key=lambda p: (_variant_position(p, folder, study), str(p)))
    if not evaluations and study is None:
        raise DataError(f"{folder} holds no results to report (no metrics.json below it, no study.json)")
    record_folders = sorted({p.parent.parent for p in folder.rglob("runs/*.json")} | {folder})
    stages = _stages(record_folders, folder)
    config = folder / "config.yaml"
    page = _template().render(
        folder=folder.resolve(), study=study, version=__version__,
        made=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        results=_table(summary_table(_csv(folder / "results.csv"))) if (folder / "results.csv").is_file() else None,
        mcnemar=_table(_csv(folder / "mcnemar.csv")) if (folder / "mcnemar.csv").is_file() else None,
        study_roc=_image(folder / "roc.png") if study and (folder / "roc.png").is_file() else None,
        evaluations=[_evaluation(p, folder) for p in evaluations], explanations=_explanations(folder),
        stages=stages, machine=stages[-1]["machine"] if stages else None,
        versions=stages[-1]["versions"] if stages else None,
        config=config.read_text() if config.is_file() else None)
    return atomic_write_text(folder / REPORT, page)


def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.PackageLoader("aml_rapids.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["num"] = lambda v, places=3: "undefined" if v is None else f"{v:.{places}f}"
    env.filters["weights_words"] = weights_words
    return env.get_template("report.html.j2")
