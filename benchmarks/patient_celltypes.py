"""What a patient-level cross-validation's attention looks at, by a cell-type column of the manifest (DeepAPL's
CellaVision ``cell_type``), and how well the share of one cell type per patient ranks the patients.

    python -m benchmarks.patient_celltypes CV_FOLDER MANIFEST [--type Promyelocyte] [--positive APL] [--top 10]

CV_FOLDER is what ``aml-rapids cv --level patient`` wrote (attention.csv, patients.csv), MANIFEST the
manifest.parquet the store was extracted from. Prints, per class, each cell type's share among every patient's
``--top`` most attended cells against its share among all their cells (the types that gain), and the patient AUC
(95% interval, patients resampled within each class) of the share of ``--type`` cells as a score for
``--positive`` beside each model's macro AUC (two classes); writes the same as JSON into CV_FOLDER.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from aml_rapids.data.manifest import read_manifest
from aml_rapids.evaluate.metrics import bootstrap, summary


def type_shares(cells: pd.DataFrame, top: int) -> pd.DataFrame:
    """Per class and cell type: share among the top-attended cells, among all cells, and their ratio."""
    ranked = cells.sort_values("attention", ascending=False)
    best = ranked.groupby(["cohort", "patient"]).head(top)
    rows = []
    for label in sorted(cells["label"].unique()):
        everyone = cells.loc[cells["label"] == label, "cell_type"].value_counts(normalize=True)
        attended = best.loc[best["label"] == label, "cell_type"].value_counts(normalize=True)
        shares = pd.DataFrame({"all": everyone, "top_attended": attended}).fillna(0.0)
        rows.append(shares.assign(label=label, gain=shares["top_attended"] / shares["all"]))
    return pd.concat(rows).rename_axis("cell_type").reset_index()


def proxy_auc(cells: pd.DataFrame, cell_type: str, positive: str, draws: int = 1000) -> dict:
    """The share of ``cell_type`` among each patient's cells as a score for ``positive``: AUC and its interval."""
    per_patient = cells.assign(hit=cells["cell_type"] == cell_type).groupby(["cohort", "patient"]).agg(
        share=("hit", "mean"), label=("label", "first"))
    y = per_patient["label"].to_numpy()
    classes = np.array(sorted(set(y)))
    score = per_patient["share"].to_numpy()
    proba = np.column_stack([np.where(classes[i] == positive, score, 1 - score) for i in range(len(classes))])
    return {"auc": summary(y, proba, classes)["auc"][positive],
            "ci95": bootstrap(y, proba, classes, n=draws)["macro_auc"], "patients": len(y)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cv", type=Path)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--column", default="cell_type")
    parser.add_argument("--type", default="Promyelocyte")
    parser.add_argument("--positive", default="APL")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    manifest = read_manifest(args.manifest).table.set_index("cell_id")
    cells = pd.read_csv(args.cv / "attention.csv", dtype={"cell_id": str, "patient": str, "cohort": str})
    cells["cell_type"] = manifest.loc[cells["cell_id"], args.column].to_numpy()
    shares = type_shares(cells, args.top)
    proxy = proxy_auc(cells, args.type, args.positive)
    metrics = json.loads((args.cv / "metrics.json").read_text())
    if len(metrics["models"][next(iter(metrics["models"]))]["auc"]) != 2:
        raise SystemExit("two classes only: the share of one cell type scores one class against the other")
    models = {name: {"macro_auc": m["macro_auc"], "ci95": m["ci95"].get("macro_auc")}
              for name, m in metrics["models"].items()}
    result = {"top_attended_per_patient": args.top, "shares": shares.to_dict(orient="records"),
              f"share of {args.type} as a score for {args.positive}": proxy, "models": models}
    (args.cv / "celltypes.json").write_text(json.dumps(result, indent=2))
    pd.set_option("display.width", 140)
    print(shares.sort_values(["label", "gain"], ascending=[True, False]).round(3).to_string(index=False))
    print(f"\npatient AUC for {args.positive}: share of {args.type} cells {proxy['auc']:.3f} "
          f"({proxy['ci95'][0]:.3f}-{proxy['ci95'][1]:.3f}), {proxy['patients']} patients; the models' macro AUC:")
    for name, m in models.items():
        print(f"  {name}: " + ("undefined" if m["macro_auc"] is None else
                               f"{m['macro_auc']:.3f} ({m['ci95'][0]:.3f}-{m['ci95'][1]:.3f})"))


if __name__ == "__main__":
    main()
