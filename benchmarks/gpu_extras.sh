#!/usr/bin/env bash
# aml-rapids' own dependencies that the GPU machine may lack (pydantic, pyarrow, pandas, typer, rich, ...), as
# Python 3.12 wheels in .carry-extra/ (git-ignored), to travel with the rest:
#   benchmarks/gpu_extras.sh && ../shared/gpu/prepare.sh dali cuml file:.carry-extra
# gpu_suite.sh installs from them only what the machine lacks. numpy is left out: the cuML stack carries its own.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .carry-extra && mkdir .carry-extra
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .carry-extra "pydantic>=2" pyarrow pandas typer rich joblib pyyaml 2>&1 | { grep -v 'is ignored' || true; }
rm -f .carry-extra/numpy-*.whl
ls .carry-extra
