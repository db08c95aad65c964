"""``python -m benchmarks STAGE``: measure a stage and its naive baseline in one run, append the results."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from aml_rapids.loader.loader import resolve_device

from . import classify_bench, extract_bench, loader_bench
from .harness import RESULTS, append_results, synthetic_manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("stage", choices=["loader", "extract", "classify"])
    parser.add_argument("--count", type=int, default=81214, help="synthetic 144x144 TIFF cells (default: full size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aml-rapids-bench")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--backbones", default="mobilenet_v2,resnet101,vgg16", help="extract: comma-separated")
    parser.add_argument("--no-warmup", action="store_true", help="time start-up too (for slow CPU runs)")
    parser.add_argument("--rows", type=int, default=56850, help="classify: training rows (default: 70%% of 81,214)")
    parser.add_argument("--pca", type=int, default=128, help="classify: PCA components per backbone")
    args = parser.parse_args(argv)

    if args.stage == "classify":
        rows = classify_bench.run(args.rows, args.pca)
        append_results(args.stage, rows, {"count": args.rows, "pca": args.pca, "dims": classify_bench.DIMS},
                       args.results)
        for row in rows:
            print(f"{row['variant']:40s} {row['seconds_median']:8.2f} s  x{row['x_naive']:.2f} scikit-learn")
        print(f"appended to {args.results}")
        return
    manifest = synthetic_manifest(args.count, args.cache)
    device = resolve_device(args.device)
    params = {"count": len(manifest.table), "repeats": args.repeats, "batch_size": args.batch_size, "device": device}
    if args.stage == "loader":
        rows = loader_bench.run(manifest, device, args.repeats, args.batch_size)
    else:
        backbones = args.backbones.split(",")
        rows = extract_bench.run(manifest, device, args.repeats, args.batch_size, backbones, not args.no_warmup)
        params["backbones"] = backbones
    append_results(args.stage, rows, params, args.results)
    for row in rows:
        print(f"{row['variant']:60s} {row['items_per_s']:9,.1f} img/s  x{row['x_naive']:.2f} naive")
    print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
