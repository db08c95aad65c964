"""``python -m benchmarks STAGE``: measure a stage and its naive baseline in one run, append the results."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from aml_rapids.loader.loader import resolve_device

from . import loader_bench
from .harness import RESULTS, append_results, synthetic_manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("stage", choices=["loader"])
    parser.add_argument("--count", type=int, default=81214, help="synthetic 144x144 TIFF cells (default: full size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aml-rapids-bench")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    manifest = synthetic_manifest(args.count, args.cache)
    device = resolve_device(args.device)
    rows = loader_bench.run(manifest, device, args.repeats, args.batch_size)
    params = {"count": len(manifest.table), "repeats": args.repeats, "batch_size": args.batch_size, "device": device}
    append_results(args.stage, rows, params, args.results)
    for row in rows:
        print(f"{row['variant']:45s} {row['items_per_s']:9,.0f} img/s  x{row['x_naive']:.2f} naive  "
              f"x{row['x_naive_full']:.2f} naive-full")
    print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
