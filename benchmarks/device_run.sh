#!/usr/bin/env bash
# Run on the device machine from the repo root: GPU tests, then the benchmark sections given.
#   [PYTEST_K=...] [TP_BENCH="allreduce scaling"] bash benchmarks/device_run.sh [pytest|nopytest] [sections...]
set -u
export PYTHONPATH="$PWD/packages/nv-kvcache/src:$PWD/packages/nv-kernels/src:$PWD/packages/nv-models/src:$PWD/packages/nv-engine/src:$PWD/tests"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
mode=${1:-pytest}; shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$mode" = pytest ]; then
  python3 -m pytest -q -x -p no:cacheprovider tests/gpu ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
fi
if [ $# -gt 0 ]; then
  python3 benchmarks/gpu_bench.py "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^\[" | tail -60
fi
# TP_BENCH="allreduce scaling": benchmarks/tp_bench.py's sections (2 GPUs)
if [ -n "${TP_BENCH:-}" ]; then
  python3 benchmarks/tp_bench.py $TP_BENCH 2>&1 | tee "$OUT/tp_bench.log" | grep -E "^\{|^#" | tail -40
fi
