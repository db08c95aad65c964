#!/usr/bin/env bash
# The whole benchmark suite on one GPU, on a machine that has only PyTorch once the wheels of
# ../shared/gpu/README.md are installed (`source .carry/install.sh` first); it reports whether the suite kept within
# its 5-minute budget (BUDGET_S) and stops it at SUITE_S. Full-size synthetic set (81,214 cells, drawn in the
# background while the GPU tests run, before the suite's clock starts; TEST_S=0 skips the tests); the naive
# baselines read the first NAIVE_COUNT cells and scikit-learn fits BASELINE_ROWS rows, since at full size they
# alone would take the whole budget. A failing test or stage does not stop the rest. Results are appended to
# benchmarks/results/results.jsonl and shown as docs/benchmarks.md's table; with OUT set, results (OUT/results.jsonl: add
# them to benchmarks/results/results.jsonl) and logs are written there as they appear. Last, outside the budget,
# a profiled compiled extraction of TRACE_COUNT cells per torch.compile mode in TRACE_MODES (empty skips them)
# writes OUT/trace-<mode>/ (benchmarks/trace_extract.py). ENGINES: the extraction's engine variants (default
# TensorRT fp16 and bf16, which need torch-tensorrt brought along, and auto; docs/engines.md). A device call runs at most 10 minutes: run the tests and
# the suite with TRACE_MODES= first, then the traces with TEST_S=0 STAGES= (the cells stay in /tmp meanwhile).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-}
logs=${OUT:-/tmp}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'" || exit 3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
extras=/tmp/carry/files/.carry-extra  # from benchmarks/gpu_extras.sh; pip adds only what is missing
if [ -d "$extras" ]; then
  python3 -m pip install -q --no-index --find-links "$extras" pydantic pyarrow pandas typer rich joblib pyyaml
fi
missing=$(python3 - <<'PY'
import importlib
wanted = ("pydantic", "pyarrow", "pandas", "typer", "rich", "yaml", "joblib", "zarr", "nvidia.dali", "cuml")
def absent(name):
    try:
        importlib.import_module(name)
    except Exception:
        return True
    return False
print(" ".join(name for name in wanted if absent(name)))
PY
)
if [ -n "$missing" ]; then
  echo "missing here: $missing (bring them: benchmarks/gpu_extras.sh, ../shared/gpu/prepare.sh dali cuml)" >&2
  exit 3
fi
python3 -m pip install --no-deps --no-build-isolation -q -e . 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
results=${OUT:+$OUT/results.jsonl}
results=${results:-benchmarks/results/results.jsonl}
count=${COUNT:-81214}
cache=${CACHE:-/tmp/aml-rapids-bench}
SECONDS=0
python3 -c "from pathlib import Path; from benchmarks.harness import synthetic_manifest
synthetic_manifest($count, Path('$cache'))" >"$logs/synthetic.log" 2>&1 &
drawing=$!
if [ "${TEST_S:-180}" -gt 0 ]; then
  timeout "${TEST_S:-180}" python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_loader.py \
    2>&1 | tee "$logs/pytest_gpu.log"
  echo "GPU tests: ${SECONDS}s"
fi
wait "$drawing" || { echo "drawing the synthetic cells failed:"; cat "$logs/synthetic.log"; exit 4; }
echo "synthetic cells ready: ${SECONDS}s"
stages=${STAGES-loader,extract,classify}  # empty: no suite (e.g. a second call for the traces alone)
if [ -n "$stages" ]; then
  suite_start=$SECONDS
  timeout "${SUITE_S:-600}" python3 -m benchmarks suite --device gpu --count "$count" --cache "$cache" \
    --naive-count "${NAIVE_COUNT:-4096}" --repeats "${REPEATS:-1}" --rows "${ROWS:-56850}" \
    --baseline-rows "${BASELINE_ROWS:-4096}" --folds "${FOLDS:-5}" --stages "$stages" \
    --engines "${ENGINES:-tensorrt:fp16,tensorrt:bf16,auto:auto}" --results "$results" "$@" 2>&1 | tee "$logs/suite.log"
  took=$((SECONDS - suite_start))
  echo "benchmark suite ($stages): ${took}s ($([ "$took" -le "${BUDGET_S:-300}" ] && echo within || echo OVER) its ${BUDGET_S:-300}s budget); all: ${SECONDS}s"
  python3 -m benchmarks.report --results "$results" | tee "$logs/table.md"
fi
for mode in ${TRACE_MODES-default reduce-overhead}; do  # after the budget: where a compiled extraction's time goes
  if timeout "${TRACE_S:-150}" python3 -m benchmarks.trace_extract --device gpu --compile "$mode" \
      --count "${TRACE_COUNT:-8192}" --cache "$cache" --out "$logs/trace-$mode" >"$logs/trace-$mode.log" 2>&1; then
    echo "trace, torch.compile $mode: $(grep -E '"(loop_images_per_s|gpu_busy_share_of_loop|gpu_busy_share_after_start)"' \
      "$logs/trace-$mode/summary.json" | tr -s ' \n' ' ')"
  else
    echo "trace, torch.compile $mode: failed (see $logs/trace-$mode.log)"
  fi
done
echo "all: ${SECONDS}s"
