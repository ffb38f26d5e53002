#!/usr/bin/env bash
# The GPU targets' checks in one device call, most important first, for a session that is lent a
# GPU for a few minutes (a lent machine goes back soon after a call ends, and what was installed
# goes with it, so build and runs share one call):
#   build    the package with the CUDA kernels (pip, no network: the image's torch and triton)
#   kernels  python -m bench.gpu_kernels: every GPU kernel's figures, each checked against the
#            reference's bytes on its first 4M elements
#   e2e      the 7B ties merge on the GPU (base + 2 fine-tunes, ~40 GB), with the read roofline
#   tests    the GPU-facing tests, in whatever time is left
# Each step runs under its own time limit and logs to $OUT/STEP.log; $OUT/summary.txt has one line
# per step, so what finished comes back even when a later step fails or runs out of time.
#
# Run from the repository root: OUT=/some/dir bash bench/gpu_session.sh [STEP ...]  (default: all,
# within BUDGET seconds, 570 by default to stay inside a 600 s call).
set -u
OUT=${OUT:-/tmp/fastmerge-gpu}
BUDGET=${BUDGET:-570}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$SECONDS

step() {  # step NAME LIMIT COMMAND...: run COMMAND under min(LIMIT, time left), log, summarise
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - start)))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    echo "$name: skipped, ${left} s left" | tee -a "$OUT/summary.txt"
    return 1
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
  return $rc
}

steps=${*:-build kernels e2e tests}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >>"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
for s in $steps; do
  case $s in
    build) step build 150 pip install --no-build-isolation --no-deps . -C cmake.define.FASTMERGE_CUDA=ON \
             -C build-dir=build/cuda || exit 1
           python -c "import fastmerge._native as n; print('CUDA kernels usable:', n.has_cuda())" | tee -a "$OUT/summary.txt" ;;
    kernels) step kernels 150 python -m bench.gpu_kernels --json "$OUT/gpu_kernels.json" ;;
    e2e) step e2e 330 python -m bench.e2e --preset 7b --fine-tunes 2 --methods ties --no-mergekit --device cuda \
           --work /tmp/fm-7b --json "$OUT/e2e-7b-cuda.json" --chart "$OUT/e2e-7b-cuda.png" ;;
    tests) step tests 300 python -m pytest -q -x -p no:cacheprovider tests/test_device_staging.py tests/ops \
             --ignore=tests/ops/test_isa_builds.py tests/methods/test_fda.py tests/io/test_lora.py \
             tests/test_extract_lora.py ;;
    *) echo "unknown step $s (build, kernels, e2e, tests)" >&2; exit 2 ;;
  esac
done
