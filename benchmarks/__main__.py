"""``python -m benchmarks STAGE``: measure a stage and its naive baseline in one run, append the results.

``suite`` runs loader, extract, classify and finetune one after another with the same arguments (the GPU suite script
and the CI smoke test both call it).
"""

from __future__ import annotations

import argparse
import tempfile
import traceback
from pathlib import Path
from typing import get_args

from aml_rapids.config import CompileMode, IndexConfig
from aml_rapids.data.manifest import Manifest, build_manifest
from aml_rapids.features.engines import ENGINES, PRECISIONS
from aml_rapids.loader.loader import resolve_device

from . import classify_bench, extract_bench, finetune_bench, loader_bench, scale_bench
from .harness import RESULTS, append_results, head, synthetic_manifest

STAGES = ("loader", "extract", "classify", "finetune")
OTHER_STAGES = ("scale",)  # run on their own, not in a suite
EXTRACT_MODES = ("eager", *get_args(CompileMode))  # eager, or a compiled variant in one of torch.compile's modes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("stage", choices=[*STAGES, *OTHER_STAGES, "suite"])
    parser.add_argument("--count", type=int, default=81214, help="synthetic 144x144 TIFF cells (default: full size)")
    parser.add_argument("--data", type=Path, help="a real dataset folder or CSV instead of synthetic cells")
    parser.add_argument("--naive-count", type=int, help="cells the naive baselines read (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aml-rapids-bench")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--backbones", default="mobilenet_v2,resnet101,vgg16", help="extract: comma-separated")
    parser.add_argument("--extract-modes", default="eager,default",
                        help=f"extract: aml-rapids variants, comma-separated: {', '.join(EXTRACT_MODES)}")
    parser.add_argument("--engines", default="all",
                        help="extract: engine variants besides the torch modes, comma-separated ENGINE:PRECISION "
                             "(e.g. openvino:bf16,openvino:int8,auto:auto), all (every one this device could run, "
                             "and auto), or none")
    parser.add_argument("--weights", default="", help="extract: weights files for some backbones, comma-separated "
                                                      "NAME=FILE (the others run with random weights)")
    parser.add_argument("--no-warmup", action="store_true", help="time start-up too (for slow CPU runs)")
    parser.add_argument("--rows", type=int, default=56850, help="classify: training rows (default: 70%% of 81,214)")
    parser.add_argument("--baseline-rows", type=int, help="classify: rows for scikit-learn (default: --rows)")
    parser.add_argument("--pca", type=int, default=128, help="classify: PCA components per backbone")
    parser.add_argument("--folds", default="5", help="classify: stacking fold counts to time, comma-separated")
    parser.add_argument("--train-images", type=int, default=960, help="finetune: cells each variant trains on")
    parser.add_argument("--finetune-backbone", default="mobilenet_v2", help="finetune: the network trained")
    parser.add_argument("--stages", default=",".join(STAGES), help="suite: the stages to run, in this order")
    parser.add_argument("--threads", type=int, default=1, help="scale: threads of each Dask worker")
    return parser


def _cells(args) -> tuple[Manifest, Manifest]:
    """The cells to read, and the first ``--naive-count`` of them for the naive baselines."""
    if args.data:
        manifest = head(build_manifest(args.data, IndexConfig(verify_decode=False)).manifest, args.count)
    else:
        manifest = synthetic_manifest(args.count, args.cache)
    return manifest, head(manifest, args.naive_count)


def _engines(asked: str, device: str) -> list[str]:
    if asked in ("all", "none"):
        return extract_bench.all_engines(device) if asked == "all" else []
    return asked.split(",")


def run_stage(stage: str, args, cells: tuple[Manifest, Manifest] | None) -> None:
    if stage == "classify":
        folds = tuple(int(k) for k in args.folds.split(","))
        rows = classify_bench.run(args.rows, args.pca, args.baseline_rows, folds)
        params = {"count": args.rows, "baseline_rows": args.baseline_rows or args.rows, "pca": args.pca,
                  "dims": classify_bench.DIMS, "folds": folds, "held_out": classify_bench.HELD_OUT}
    else:
        manifest, naive = cells
        device = resolve_device(args.device)
        params = {"count": len(manifest.table), "naive_count": len(naive.table), "repeats": args.repeats,
                  "batch_size": args.batch_size, "device": device, "data": str(args.data or "synthetic")}
        if stage == "loader":
            rows = loader_bench.run(manifest, naive, device, args.repeats, args.batch_size)
        elif stage == "scale":
            params.update(backbones=args.backbones.split(","), threads_per_worker=args.threads,
                          weights=dict(item.split("=", 1) for item in args.weights.split(",") if item))
            rows = scale_bench.run(manifest, device, args.repeats, args.batch_size, params["backbones"],
                                   params["weights"], args.threads)
        elif stage == "finetune":
            params.update(train_images=args.train_images, backbone=args.finetune_backbone, batch_size=32)
            rows = finetune_bench.run(manifest, args.train_images, args.repeats, args.finetune_backbone, device)
        else:
            params["backbones"] = args.backbones.split(",")
            params["modes"] = args.extract_modes.split(",")
            params["engines"] = _engines(args.engines, device)
            params["weights"] = dict(item.split("=", 1) for item in args.weights.split(",") if item)
            rows = extract_bench.run(manifest, naive, device, args.repeats, args.batch_size, params["backbones"],
                                     not args.no_warmup, tuple(params["modes"]), tuple(params["engines"]),
                                     params["weights"])
    append_results(stage, rows, params, args.results)
    for row in rows:
        ratio = (f"x{row['x_naive']:.2f} naive" if row.get("x_naive") is not None else
                 f"x{row['x_single_process']:.2f} single process" if "x_single_process" in row else
                 "(no baseline at this size)")
        floor = f"  {row['floor_fraction']:.1%} of floor" if "floor_fraction" in row else ""
        print(f"{stage:8s} {row['variant']:72s} {row['items_per_s']:11,.1f}/s  {ratio}{floor}")


def main(argv=None) -> None:
    """Each stage's results are appended as soon as it ends; in a suite, a stage that fails is reported and the
    next one still runs (the exit status says which failed)."""
    args = _parser().parse_args(argv)
    stages = tuple(args.stages.split(",")) if args.stage == "suite" else (args.stage,)
    unknown = set(stages) - set(STAGES) - (set(OTHER_STAGES) if args.stage != "suite" else set())
    if unknown:
        raise SystemExit(f"unknown stages: {', '.join(sorted(unknown))} (choose from {', '.join(STAGES)})")
    unknown = set(args.extract_modes.split(",")) - set(EXTRACT_MODES)
    if unknown:
        raise SystemExit(f"unknown --extract-modes: {', '.join(sorted(unknown))} (choose from "
                         f"{', '.join(EXTRACT_MODES)})")
    wrong = [e for e in ([] if args.engines in ("all", "none") else args.engines.split(","))
             if len(e.split(":")) != 2 or e.split(":")[0] not in ("auto", *ENGINES)
             or e.split(":")[1] not in ("auto", *PRECISIONS)]
    if wrong:
        raise SystemExit(f"unknown --engines: {', '.join(wrong)} (each ENGINE:PRECISION, engines "
                         f"{', '.join(('auto', *ENGINES))}; precisions {', '.join(('auto', *PRECISIONS))})")
    cells = _cells(args) if set(stages) & {"loader", "extract", "finetune", "scale"} else None
    failed = []
    for stage in stages:
        try:
            run_stage(stage, args, cells)
        except Exception:
            if len(stages) == 1:
                raise
            traceback.print_exc()
            failed.append(stage)
    print(f"appended to {args.results}")
    if failed:
        raise SystemExit(f"stages that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
