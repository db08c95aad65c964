"""The cross-site benchmark: trained on PBC (Barcelona), tested on DeepAPL's cells of the same types (Baltimore).

    python -m benchmarks.cross_site [--shared ../shared] [-o runs/cross-site]

Writes OUT/cells.csv (PBC's 8 types, and the DeepAPL cells whose CellaVision type maps to one of them), runs
configs/studies/cross-site.yaml on it (cohort split: PBC train with an image-grouped 15% validation part held out,
DeepAPL test), evaluates each variant's model on PBC's held-out part too, and writes OUT/cross-site.json: per
variant the cross-site and the in-site accuracy and macro F1 with their intervals, and the share of the site
change's cost each variant recovers. The study's own results.md holds McNemar's tests against ``none``.
Then the drift checks (OUT/drift/): PBC against DeepAPL, and two random halves of PBC against each other, each
half and DeepAPL extracted into a store of its own with the study's ``none`` settings. Then retraining
(OUT/retrain/): PBC split by image and DeepAPL by patient (70/15/15 each), both extracted into one store (the
second appended), one model trained on the union, its test results per cohort side by side. ``--parts`` picks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from aml_rapids import workflow
from aml_rapids.config import RunConfig, as_overrides, load_config
from aml_rapids.study.runner import run_study
from aml_rapids.study.spec import read_spec

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "configs" / "studies" / "cross-site.yaml"
# DeepAPL's CellaVision types that are one of PBC's eight; every other type is left out
PBC_TYPE = {"Lymphocyte": "lymphocyte", "Segmented neutrophils": "neutrophil", "Band neutrophils": "neutrophil",
            "Monocyte": "monocyte", "Eosinophils": "eosinophil", "Basophil": "basophil",
            "Erythroblast": "erythroblast", "Promyelocyte": "ig", "Myelocyte": "ig", "Metamyelocyte": "ig",
            "Giant thrombocyte": "platelet"}
COHORTS = ("pbc144", "deepapl144")


def cells_csv(shared: Path, out: Path) -> Path:
    """One CSV of both cohorts: absolute path, label, patient (DeepAPL only), cohort, DeepAPL's cell type."""
    pbc = shared / "data" / "pbc144"
    rows = [{"path": str(f.resolve()), "label": f.parent.name, "patient": "", "cohort": "pbc144", "cell_type": ""}
            for f in sorted(pbc.glob("*/*.jpg"))]
    apl = shared / "data" / "deepapl144"
    table = pd.read_csv(apl / "manifest.csv")
    kept = table[table["cell_type"].isin(PBC_TYPE)]
    rows += [{"path": str((apl / p).resolve()), "label": PBC_TYPE[t], "patient": patient, "cohort": "deepapl144",
              "cell_type": t} for p, t, patient in zip(kept["path"], kept["cell_type"], kept["patient"])]
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "cells.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    print(f"{csv}: {sum(r['cohort'] == 'pbc144' for r in rows):,} PBC cells, {len(kept):,} DeepAPL cells "
          f"(of {len(table):,}; other types left out)")
    return csv


def _level(report: dict) -> dict:
    level = report["cell_level"]
    return {"n": level["n"], "accuracy": level["accuracy"], "accuracy_ci95": level["ci95"]["accuracy"],
            "macro_f1": level["macro"]["f1"], "macro_f1_ci95": level["ci95"]["macro_f1"]}


def summarise(study: Path) -> dict:
    """Per variant: cross-site (DeepAPL test) and in-site (PBC's held-out val part) results, and the share of the
    site change's cost recovered against ``none``."""
    results = {}
    for record in sorted((study / "variants").glob("*/variant.json")):
        variant = json.loads(record.read_text())
        model = record.parent / "model"
        if not (model / "eval-test" / "metrics.json").is_file():
            results[variant["name"]] = {"cross_site": "not evaluated (the variant failed)"}
            continue
        cross = json.loads((model / "eval-test" / "metrics.json").read_text())
        store = study / variant["store"]
        in_site = (_level(workflow.evaluate(model, store, "val", model / "eval-val").metrics) if store.is_dir()
                   else f"not evaluated: the variant's store {store} is gone")
        results[variant["name"]] = {"cross_site": _level(cross), "in_site": in_site,
                                    "protocol": cross["split_protocol"]}
    base = results.get("none")
    if base and isinstance(base["in_site"], dict):
        cost = base["in_site"]["accuracy"] - base["cross_site"]["accuracy"]
        for r in results.values():
            r["recovered_share_of_cost"] = ((r["cross_site"]["accuracy"] - base["cross_site"]["accuracy"]) / cost
                                            if cost > 0 else "the site change cost nothing to recover")
    return results


def drift_config() -> RunConfig:
    """The study's base settings without its split: the stores of the drift checks hold every cell un-augmented."""
    spec = read_spec(STUDY)
    shared = {k: v for k, v in spec.set.items() if not k.startswith("split.")}
    return load_config(STUDY.parent / spec.config, as_overrides(shared))


def drift_checks(csv: Path, out: Path, seed: int = 0) -> dict:
    """PBC (its half A) against DeepAPL, and PBC's half A against its half B (cells drawn at random: PBC has no
    patients), each side its own store; the drift verdicts and AUROCs."""
    cells = pd.read_csv(csv, keep_default_na=False)
    pbc = cells[cells["cohort"] == "pbc144"]
    half = np.random.default_rng(seed).permutation(len(pbc)) < len(pbc) // 2
    parts = {"pbc144-half-a": pbc[half].assign(cohort="pbc144-half-a"),
             "pbc144-half-b": pbc[~half].assign(cohort="pbc144-half-b"),
             "deepapl144": cells[cells["cohort"] == "deepapl144"]}
    cfg = drift_config()
    stores = {}
    for name, table in parts.items():
        folder = out / "drift" / name
        folder.mkdir(parents=True, exist_ok=True)
        table.to_csv(folder / "cells.csv", index=False)
        if not (folder / "manifest.parquet").is_file():
            workflow.index(folder / "cells.csv", folder, cfg)
        stores[name] = workflow.extract(folder / "manifest.parquet", folder / "features.zarr", cfg).store
    verdicts = {}
    for reference, new in (("pbc144-half-a", "deepapl144"), ("pbc144-half-a", "pbc144-half-b")):
        result = workflow.drift(stores[reference], stores[new], out / "drift" / f"{reference}-vs-{new}", cfg)
        verdicts[f"{reference} vs {new}"] = {"flagged": result.flagged, "auroc": result.auroc,
                                             "threshold": result.threshold, "notes": result.notes}
    return verdicts


def retrain(csv: Path, out: Path) -> dict:
    """One model trained on both cohorts' training parts, evaluated on both test parts: each cohort's results."""
    cells = pd.read_csv(csv, keep_default_na=False)
    store = out / "retrain" / "features.zarr"
    for cohort, method in (("pbc144", "image"), ("deepapl144", "patient")):
        folder = out / "retrain" / cohort
        folder.mkdir(parents=True, exist_ok=True)
        cells[cells["cohort"] == cohort].to_csv(folder / "cells.csv", index=False)
        cfg = load_config(None, [f"split.method={method}"], base=drift_config().model_dump(mode="json"))
        if not (folder / "manifest.parquet").is_file():
            workflow.index(folder / "cells.csv", folder, cfg)
            workflow.split(folder / "manifest.parquet", cfg)
        workflow.extract(folder / "manifest.parquet", store, cfg)
    cfg = drift_config()
    model = workflow.train(store, out / "retrain" / "model", cfg, overwrite=True).model
    report = workflow.evaluate(model, store, "test", model / "eval-test", cfg).metrics
    return {cohort: _level({"cell_level": level}) for cohort, level in report["by_cohort"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cross_site", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs") / "cross-site")
    parser.add_argument("--parts", default="study,drift,retrain", help="comma-separated: study, drift, retrain")
    args = parser.parse_args()
    parts = args.parts.split(",")
    csv = cells_csv(args.shared, args.out)
    if "study" in parts:
        study = args.out / "study"
        reference = args.shared / "data" / "pbc144" / "neutrophil" / "BNE_100878.jpg"
        run_study(STUDY, study, csv, [f"stain_norm.reference={reference}"], allow_failed=True)
        results = summarise(study)
        (args.out / "cross-site.json").write_text(json.dumps(results, indent=2))
        for name, r in results.items():
            if not isinstance(r["cross_site"], dict):
                print(f"{name}: {r['cross_site']}")
                continue
            in_site = r["in_site"]["accuracy"] if isinstance(r["in_site"], dict) else float("nan")
            print(f"{name}: cross-site accuracy {r['cross_site']['accuracy']:.3f}, macro F1 "
                  f"{r['cross_site']['macro_f1']:.3f}; in-site accuracy {in_site:.3f}; recovered "
                  f"{r.get('recovered_share_of_cost')} of the cost")
    if "drift" in parts:
        verdicts = drift_checks(csv, args.out)
        (args.out / "drift.json").write_text(json.dumps(verdicts, indent=2))
        for pair, v in verdicts.items():
            print(f"{pair}: {'FLAGGED' if v['flagged'] else 'not flagged'}, AUROC "
                  + ", ".join(f"{b} {a:.3f}" for b, a in v["auroc"].items()))
    if "retrain" in parts:
        both = retrain(csv, args.out)
        (args.out / "retrain.json").write_text(json.dumps(both, indent=2))
        for cohort, r in both.items():
            print(f"retrained on both, tested on {cohort}: accuracy {r['accuracy']:.3f}, macro F1 {r['macro_f1']:.3f}")


if __name__ == "__main__":
    main()
