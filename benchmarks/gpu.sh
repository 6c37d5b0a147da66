#!/usr/bin/env bash
# fastcl on a CUDA machine, in one call of about 10 minutes: the CUDA tests, then the report.
# Everything lands in one folder: env.txt, tests.log, report.log, report.txt, results.json,
# plot.png. Needs torch, triton and numpy (pytest and hypothesis for the tests; without them
# the tests are skipped and tests.log says so). Runs from a source checkout, no install:
#
#     bash benchmarks/gpu.sh [OUT_DIR]
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu-report-$(date -u +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  nvidia-smi || true
  $PY -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1

if $PY -c "import pytest, hypothesis" 2>/dev/null; then
  # The CUDA parametrizations (triton-cuda, chunked-cuda) of the whole suite.
  CI=1 timeout 240 $PY -m pytest tests -q -p no:cacheprovider -k cuda > "$OUT/tests.log" 2>&1
  echo "pytest exit code: $?" >> "$OUT/tests.log"
else
  echo "pytest / hypothesis not installed: CUDA tests skipped" > "$OUT/tests.log"
fi

timeout 330 $PY -m fastcl.bench --device cuda --large --out "$OUT" > "$OUT/report.log" 2>&1
echo "report exit code: $?" >> "$OUT/report.log"
echo "written to $OUT"
