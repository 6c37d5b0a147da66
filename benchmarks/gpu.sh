#!/usr/bin/env bash
# fastcl on a CUDA machine, in one call of at most 10 minutes: correctness before speed, each
# section under its own time budget, every result written to the output folder as soon as its
# section (or, for the correctness matrix, its case) finishes. Runs from a source checkout, no
# install; needs torch, triton and numpy (pytest and hypothesis for section d).
#
#     bash benchmarks/gpu.sh [OUT_DIR]
#
# Sections (budget in seconds; each is also capped by the time left before TOTAL_BUDGET, and
# the report gets whatever the earlier sections left unused):
#   a   15  env.txt: date, nvidia-smi, versions
#   b  170  check.txt: benchmarks/gpu_check.py, fp32/tf32/bf16/fp16 x every public loss x
#           D in {64,128,256,1024}, value and gradients against float64 (one line per case,
#           appended as it runs), then a queue push past 2^31 elements; compile_stats.txt
#   c   40  compile_stats.txt (registers, spills, shared memory of the Triton kernels that b
#           compiled, rewritten after each dtype) copied into c.log; launches.txt: kernels per
#           training step (torch.profiler) for nt_xent and the MoCo queue loss
#   d  105  tests.log: the CUDA parametrizations of the test suite (pytest -k cuda)
#   clip 80 clip.txt: benchmarks/gpu_clip.py, CLIP's loss forward + backward with a learnable
#           scale at N = 16384 and 32768, D = 512, bf16: fastcl against open_clip's formula
#           (eager, torch.compile) and Inf-CL when installed, time and peak memory (its
#           correctness cases are in b's matrix)
#   siglip 60 siglip.txt: the same script with --loss siglip: SigLIP's loss with a learnable
#           scale and bias at N = 16384 and 32768, D = 512, bf16, against open_clip's
#           SigLipLoss formula (eager, torch.compile); its correctness cases are in b's matrix
#   supcon 60 supcon.txt: the same script with --loss supcon: SupCon's loss at 16384 samples x
#           2 views, D = 128, 1000 classes, temperature 0.07, bf16, against SupContrast's
#           SupConLoss formula (eager, torch.compile); its correctness cases (learnable
#           temperature) are in b's matrix
#   e  rest report-fp32/, report-bf16/, report-tf32/: python -m fastcl.bench, one folder per
#           input configuration (report.txt, results.json, plot.png), fp32 with --large
# summary.txt gets "SECTION x: ok|failed|timeout in N s" as each section ends.
#
# FASTCL_GPU_SH_DEVICE=cpu runs the same sections on the CPU with small sizes (a smoke test of
# this script: every section writes its output; the figures mean nothing).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu-report-$(date -u +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python}
DEVICE=${FASTCL_GPU_SH_DEVICE:-cuda}
TOTAL_BUDGET=${FASTCL_GPU_SH_BUDGET:-570}  # seconds, leaving room inside a 10-minute call
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
if [ "$DEVICE" = cpu ]; then
  SMALL=--small; QUICK=--quick; LARGE=
else
  SMALL=; QUICK=; LARGE=--large
fi

# section NAME BUDGET COMMAND...: run COMMAND under min(BUDGET, time left), record the outcome.
section() {
  local name=$1 budget=$2
  shift 2
  local left=$(( TOTAL_BUDGET - ($(date +%s) - START) ))
  if [ "$budget" -gt "$left" ]; then budget=$left; fi
  if [ "$budget" -lt 5 ]; then
    echo "SECTION $name: timeout in 0 s (no time left)" >> "$SUMMARY"
    return
  fi
  local t0=$(date +%s) rc status
  timeout --kill-after=10 "$budget" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status="failed (exit $rc)" ;;
  esac
  echo "SECTION $name: $status in $(( $(date +%s) - t0 )) s (budget $budget s)" >> "$SUMMARY"
}

env_info() {
  date -u
  if [ "$DEVICE" = cuda ]; then nvidia-smi || true; else echo "FASTCL_GPU_SH_DEVICE=cpu: smoke test"; fi
  $PY -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  git log -1 --format='fastcl %H %s' 2>/dev/null || true
}

check() {
  $PY benchmarks/gpu_check.py --device "$DEVICE" $SMALL --out "$OUT/check.txt" \
    --stats "$OUT/compile_stats.txt"
}

stats() {
  echo "# Triton kernels compiled during section b:"
  cat "$OUT/compile_stats.txt" 2>/dev/null || echo "(no compile_stats.txt: section b wrote none)"
  echo "# kernels per training step:"
  $PY benchmarks/gpu_check.py --launches --device "$DEVICE" $SMALL --out "$OUT/launches.txt"
}

cuda_tests() {
  if ! $PY -c "import pytest, hypothesis" 2>/dev/null; then
    echo "pytest / hypothesis not installed: CUDA tests skipped"
    return 0
  fi
  # The CUDA parametrizations (triton-cuda, chunked-cuda) of the whole suite.
  CI=1 $PY -m pytest tests -q -p no:cacheprovider -k cuda
  local rc=$?
  echo "pytest exit code: $rc"
  # 5: nothing selected (no CUDA device in the smoke test)
  if [ "$rc" -eq 5 ] && [ "$DEVICE" = cpu ]; then return 0; fi
  return $rc
}

clip_bench() {  # clip_bench LOSS BUDGET: LOSS is clip, siglip or supcon
  local loss=$1 budget=$2 shape
  if [ "$loss" = supcon ]; then
    shape="--sizes 16384 --dim 128 --classes 1000"  # samples, 2 views each
  else
    shape="--sizes 16384,32768 --dim 512"
  fi
  if [ "$DEVICE" = cpu ]; then
    $PY benchmarks/gpu_clip.py --loss "$loss" --device cpu --small --providers fastcl,eager \
      --out "$OUT/$loss.txt"
  else
    # Stop starting measurements 15 s before the section's end (a compile takes ~20-40 s).
    $PY benchmarks/gpu_clip.py --loss "$loss" --device cuda $shape \
      --dtype bf16 --budget $(( budget > 30 ? budget - 15 : budget )) --out "$OUT/$loss.txt"
  fi
}

report() {  # report CONFIG [EXTRA...]: one input configuration into report-CONFIG/
  local config=$1
  shift
  $PY -m fastcl.bench --device "$DEVICE" --dtypes "$config" $QUICK "$@" --out "$OUT/report-$config"
}

export PY DEVICE SMALL QUICK LARGE OUT
export -f env_info check stats cuda_tests clip_bench report
section a 15 bash -c env_info > "$OUT/env.txt" 2>&1
section b 170 bash -c check > "$OUT/check.log" 2>&1
section c 40 bash -c stats > "$OUT/c.log" 2>&1
section d 105 bash -c cuda_tests > "$OUT/tests.log" 2>&1
section clip 80 bash -c 'clip_bench clip 80' > "$OUT/clip.log" 2>&1
section siglip 60 bash -c 'clip_bench siglip 60' > "$OUT/siglip.log" 2>&1
section supcon 60 bash -c 'clip_bench supcon 60' > "$OUT/supcon.log" 2>&1
# The report: fp32 first (with --large on CUDA), then bf16 and tf32, sharing what is left.
left=$(( TOTAL_BUDGET - ($(date +%s) - START) ))
section e.fp32 $(( left * 45 / 100 )) bash -c 'report fp32 $LARGE' > "$OUT/report-fp32.log" 2>&1
left=$(( TOTAL_BUDGET - ($(date +%s) - START) ))
section e.bf16 $(( left * 55 / 100 )) bash -c 'report bf16' > "$OUT/report-bf16.log" 2>&1
left=$(( TOTAL_BUDGET - ($(date +%s) - START) ))
section e.tf32 "$left" bash -c 'report tf32' > "$OUT/report-tf32.log" 2>&1
echo "total $(( $(date +%s) - START )) s" >> "$SUMMARY"
cat "$SUMMARY"
echo "written to $OUT"
