#!/usr/bin/env bash
# Run on the device machine from the repo root: the GPU suite, then the benchmark sections given.
#   [PYTEST_K=...] [TP_BENCH="allreduce scaling"] bash benchmarks/device_run.sh [pytest|nopytest] [sections...]
# `pytest` runs tests/gpu whole in one pytest (with 2 GPUs that includes the TP=2 tests; the
# shutdown scripts run beside the rest), under timeout -s ABRT so a hang prints its stack; then
# the gpu_bench.py sections, then tp_bench.py's. Logs go to $OUT (pytest_gpu.log, bench.log,
# tp_bench.log).
set -u
export PYTHONPATH="$PWD/packages/nv-kvcache/src:$PWD/packages/nv-kernels/src:$PWD/packages/nv-models/src:$PWD/packages/nv-engine/src:$PWD/tests"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
LIMIT=${PYTEST_LIMIT_S:-475}  # the suite must take under 8 minutes on the H200 (issue 13)
mode=${1:-pytest}; shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$mode" = pytest ]; then
  t=$(date +%s)
  timeout -s ABRT "$LIMIT" python3 -m pytest -q -rA -p no:cacheprovider --durations=12 tests/gpu \
    ${PYTEST_K:+-k "$PYTEST_K"} > "$OUT/pytest_gpu.log" 2>&1
  echo "pytest exit $? in $(( $(date +%s) - t )) s" | tee -a "$OUT/pytest_gpu.log"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_gpu.log" | tail -12
fi
if [ $# -gt 0 ]; then
  python3 benchmarks/gpu_bench.py "$@" > "$OUT/bench.log" 2>&1
  grep "^name=" "$OUT/bench.log"
fi
# TP_BENCH="allreduce scaling": benchmarks/tp_bench.py's sections (2 GPUs)
if [ -n "${TP_BENCH:-}" ]; then
  python3 benchmarks/tp_bench.py $TP_BENCH 2>&1 | tee "$OUT/tp_bench.log" | grep -E "^\{|^#" | tail -40
fi
