#!/usr/bin/env bash
# The whole benchmark suite on one GPU in at most 5 minutes, on a machine that has only PyTorch once the wheels
# of ../shared/gpu/README.md are installed (`source .carry/install.sh` first). Full-size synthetic set (81,214
# cells); the naive baselines read the first NAIVE_COUNT cells and scikit-learn fits BASELINE_ROWS rows, since
# at full size they alone would take the whole budget. Results are appended to benchmarks/results/results.jsonl
# (copied to $OUT when set) and shown as the README's table.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'"
python3 -m pip install --no-deps --no-build-isolation -q -e . 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m benchmarks suite --device gpu --count "${COUNT:-81214}" --naive-count "${NAIVE_COUNT:-4096}" \
  --repeats "${REPEATS:-1}" --rows "${ROWS:-56850}" --baseline-rows "${BASELINE_ROWS:-8192}" "$@"
python3 -m benchmarks.report
if [ -n "${OUT:-}" ]; then cp benchmarks/results/results.jsonl "$OUT/"; fi
