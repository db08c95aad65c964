#!/usr/bin/env bash
# The whole benchmark suite on one GPU in at most 5 minutes, on a machine that has only PyTorch once the wheels
# of ../shared/gpu/README.md are installed (`source .carry/install.sh` first). Full-size synthetic set (81,214
# cells); the naive baselines read the first NAIVE_COUNT cells and scikit-learn fits BASELINE_ROWS rows, since
# at full size they alone would take the whole budget. Results are appended to benchmarks/results/results.jsonl
# (copied to $OUT when set) and shown as the README's table.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'"
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
python3 -m benchmarks suite --device gpu --count "${COUNT:-81214}" --naive-count "${NAIVE_COUNT:-4096}" \
  --repeats "${REPEATS:-1}" --rows "${ROWS:-56850}" --baseline-rows "${BASELINE_ROWS:-8192}" "$@"
python3 -m benchmarks.report
if [ -n "${OUT:-}" ]; then cp benchmarks/results/results.jsonl "$OUT/"; fi
