#!/usr/bin/env bash
# Run on the device machine from the repo root: GPU tests, then the benchmark sections given.
#   [PYTEST_K=...] [TP_BENCH="allreduce scaling"] bash benchmarks/device_run.sh [pytest|nopytest] [sections...]
# With 2 GPUs, `pytest` runs tests/gpu -k "not tp2" on GPU 0 while the sections run on GPU 1,
# then the tp2 tests on both. Logs go to $OUT (pytest_gpu.log, bench.log, pytest_tp2.log, ...).
set -u
export PYTHONPATH="$PWD/packages/nv-kvcache/src:$PWD/packages/nv-kernels/src:$PWD/packages/nv-models/src:$PWD/packages/nv-engine/src:$PWD/tests"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
LIMIT=${PYTEST_LIMIT_S:-400}  # each pytest run; SIGABRT makes faulthandler print where it hung
mode=${1:-pytest}; shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
bench() {
  if [ $# -gt 0 ]; then
    python3 benchmarks/gpu_bench.py "$@" > "$OUT/bench.log" 2>&1
    grep "^name=" "$OUT/bench.log"
  fi
}
if [ "$mode" = pytest ] && [ "$gpus" -ge 2 ] && [ -z "${PYTEST_K:-}" ]; then
  CUDA_VISIBLE_DEVICES=0 timeout -s ABRT "$LIMIT" python3 -m pytest -q -p no:cacheprovider tests/gpu -k "not tp2" \
    > "$OUT/pytest_gpu.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 bench "$@"
  wait
  tail -3 "$OUT/pytest_gpu.log"
  timeout -s ABRT "$LIMIT" python3 -m pytest -q -rA -p no:cacheprovider tests/gpu -k tp2 2>&1 \
    | tee "$OUT/pytest_tp2.log" \
    | grep -E "passed|failed|started in|closed in|step failed"
else
  if [ "$mode" = pytest ]; then
    timeout -s ABRT "$LIMIT" python3 -m pytest -q -p no:cacheprovider tests/gpu \
      ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 \
      | tee "$OUT/pytest_gpu.log" | tail -25
  fi
  bench "$@"
fi
# TP_BENCH="allreduce scaling": benchmarks/tp_bench.py's sections (2 GPUs)
if [ -n "${TP_BENCH:-}" ]; then
  python3 benchmarks/tp_bench.py $TP_BENCH 2>&1 | tee "$OUT/tp_bench.log" | grep -E "^\{|^#" | tail -40
fi
