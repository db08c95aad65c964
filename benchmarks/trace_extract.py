"""Where an extraction's time goes, kernel by kernel: ``python -m benchmarks.trace_extract --out DIR``.

The extraction (networks loaded once, a warm-up pass first) runs over ``--count`` synthetic cells under
torch.profiler. Written to ``DIR``: ``trace.json.gz`` (open it in https://ui.perfetto.dev), ``ops.txt`` (kernels
on a GPU, operators on a CPU, by time) and ``summary.json``: the extraction loop's seconds and breakdown, and on
a GPU the seconds during which at least one kernel or copy ran (concurrent ones counted once), their share of the
loop (whole, and once the loader's first batch is in hand: a short trace weighs the loader's start heavily), and
that time by kind of kernel and by stream. A share near 1 means the GPU is the limit and only faster
kernels help; well below 1, the host (launches, the loader, the hand-off) leaves the GPU idle, and CUDA graphs
or more overlap would help.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from pathlib import Path
from typing import get_args

from torch.profiler import ProfilerActivity, profile

from aml_rapids.config import CompileMode
from aml_rapids.features.extract import load_backbones
from aml_rapids.loader.loader import resolve_device

from .extract_bench import AmlExtract
from .extract_parts import bench_config
from .harness import WARMUP_CELLS, head, synthetic_manifest

DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")
# kind of device work, by the first pattern found in its (lower-cased) name
KINDS = (("memcpy", "copy"), ("memset", "copy"), ("dali", "loader (DALI)"), ("triton", "fused (inductor, Triton)"),
         ("conv", "convolution"), ("xmma", "convolution"), ("gemm", "matrix multiply"), ("cutlass", "matrix multiply"))


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals in microseconds, in seconds."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total / 1e6


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for pattern, kind in KINDS if pattern in lowered), "other")


def device_time(events: list[dict], loop_seconds: float, after_start_seconds: float) -> dict:
    """Busy seconds of the device events of a Chrome trace: in all, by kind of work and by stream, and their share
    of the loop, whole and once the loader's first batch was in hand."""
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events]
    busy = busy_seconds(spans)
    by = {"kind": {}, "stream": {}}
    for e, span in zip(events, spans):
        by["kind"].setdefault(kind_of(e["name"]), []).append(span)
        by["stream"].setdefault(str(e.get("tid")), []).append(span)
    return {"gpu_busy_seconds": busy, "gpu_busy_share_of_loop": busy / loop_seconds,
            "gpu_busy_share_after_start": busy / after_start_seconds, "gpu_events": len(events),
            **{f"busy_seconds_by_{key}": {name: busy_seconds(s) for name, s in sorted(groups.items())}
               for key, groups in by.items()}}


def trace(count: int, device: str, batch_size: int, backbones: list[str], compile_mode: str | None, out: Path,
          cache: Path) -> dict:
    """``compile_mode``: torch.compile's mode, None for eager networks."""
    manifest = synthetic_manifest(count, cache)
    cfg = bench_config(backbones, device, batch_size, compile_mode is not None, compile_mode or "default")
    run = AmlExtract(cfg, load_backbones(cfg, "cuda" if device == "gpu" else "cpu"))
    run(head(manifest, min(WARMUP_CELLS, count)))  # start-up, autotuning, compilation: not traced
    activities = [ProfilerActivity.CUDA] if device == "gpu" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run(manifest)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "trace.json"
    prof.export_chrome_trace(str(raw))
    events = json.loads(raw.read_text())["traceEvents"]
    with gzip.open(out / "trace.json.gz", "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    raw.unlink()
    sort_by = "self_device_time_total" if device == "gpu" else "self_cpu_time_total"
    (out / "ops.txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=40))
    traced = run.summaries[-1]
    summary = {"images": traced.rows_written, "device": device, "backbones": backbones,
               "compile_mode": compile_mode, "batch_size": batch_size, "loop_seconds": traced.seconds,
               "loop_images_per_s": traced.images_per_s, "breakdown": traced.seconds_in}
    if device == "gpu":
        summary.update(device_time([e for e in events if e.get("cat") in DEVICE_EVENTS], traced.seconds,
                                   traced.seconds_after_start))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trace_extract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=8192, help="synthetic cells traced (after a warm-up pass)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--backbones", default="mobilenet_v2,resnet101,vgg16")
    parser.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                        choices=get_args(CompileMode),
                        help="torch.compile the networks, in this mode (default: default), during the warm-up")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aml-rapids-bench")
    args = parser.parse_args(argv)
    summary = trace(args.count, resolve_device(args.device), args.batch_size, args.backbones.split(","),
                    args.compile, args.out, args.cache)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
