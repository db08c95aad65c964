#!/usr/bin/env bash
# Dask on the GPU machine (issue 24's GPU check): `local-cuda` with one worker per GPU against today's
# single-process path, the same cells and networks in one run (python -m benchmarks scale), and the GPU tests of
# tests/test_scale.py. Needs the wheels of ../shared/gpu/README.md (`../shared/gpu/prepare.sh dali cuml` here, one
# `run` per part there, then `source .carry/install.sh && bash benchmarks/gpu_scale.sh`). Results go to
# $OUT/results.jsonl (add them to benchmarks/results/results.jsonl) and logs to $OUT. Goal: local-cuda with one GPU
# at >= 0.95 of the single-process rate (x_single_process in the results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'" || exit 3
python3 -c "import dask_cuda, distributed, zarr, nvidia.dali" || { echo "bring dask-cuda, DALI, Zarr: ../shared/gpu/prepare.sh dali" >&2; exit 3; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install --no-deps --no-build-isolation -q -e . 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
timeout "${TEST_S:-120}" python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_scale.py 2>&1 | tee "$OUT/pytest_scale_gpu.log"
timeout "${BENCH_S:-420}" python3 -m benchmarks scale --device gpu --count "${COUNT:-20000}" \
  --backbones "${BACKBONES:-mobilenet_v2,resnet101,vgg16}" --batch-size 256 --repeats "${REPEATS:-3}" \
  --results "$OUT/results.jsonl" 2>&1 | grep -v "distributed\.\(nanny\|scheduler\|core\|worker\)" | tee "$OUT/scale_bench.log"
