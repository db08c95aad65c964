"""One more cross-site variant, run after the study outside its folder (the study could not resume: its base
settings had changed): Reinhard over the cell's foreground (region cell). Paths are those of the 2026-12-07 run."""
import json
from pathlib import Path
from aml_rapids import workflow
from aml_rapids.config import load_config
from aml_rapids.study.compare import read_variant, mcnemar_table
from benchmarks.cross_site import drift_config, _level
study = Path("/tmp/xs/run/study")
out = Path("/tmp/xs/run/cell-norm")
base = drift_config().model_dump(mode="json")
cfg = load_config(None, ["split.method=cohort", "split.test_cohorts=[deepapl144]", "split.val=0.15",
                         "stain_norm.method=reinhard", "stain_norm.region=cell"], base=base)
store = out / "features.zarr"
workflow.extract(study / "manifest.parquet", store, cfg)
model = workflow.train(store, out / "model", cfg, overwrite=True).model
test = workflow.evaluate(model, store, "test", model / "eval-test", cfg).metrics
val = workflow.evaluate(model, store, "val", model / "eval-val", cfg).metrics
ref = read_variant("none", next(study.glob("variants/none-*")) / "model" / "eval-test")
mine = read_variant("stain normalisation (cell)", model / "eval-test")
tests = mcnemar_table([ref, mine], "none")
result = {"cross_site": _level(test), "in_site": _level(val), "protocol": test["split_protocol"],
          "mcnemar": tests.to_dict(orient="records")}
(out / "result.json").write_text(json.dumps(result, indent=2, default=str))
print(json.dumps(result, indent=1, default=str))
