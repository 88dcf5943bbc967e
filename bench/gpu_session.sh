#!/usr/bin/env bash
# One device-machine session: install fastopt from the working tree, run the GPU tests (REQUIRE_GPU=1: none may
# skip), the launch-shape sweep and the GPU benchmarks, logs and JSON under $OUT.
# Usage: bash bench/gpu_session.sh tests,tune,bench [BENCH_K] [TEST_K]
set -u
export PYTHONUNBUFFERED=1 FASTOPT_CUDA_CACHE=/tmp/fastopt-cuda NUMBA_CACHE_DIR=/tmp/numba-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=${1:-tests,bench}; bench_k=${2:-}; test_k=${3:-}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import sys, cupy, torch, numba, numpy; print(sys.version); print('cupy', cupy.__version__, 'torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)"
  date -u; } 2>&1 | tee "$OUT/machine.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
if [[ $what == *tests* ]]; then
  REQUIRE_GPU=1 timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q --no-header -p no:cacheprovider ${test_k:+-k "$test_k"} \
    ${TESTS:-tests/test_cuda.py tests/test_torch_adapter.py tests/test_cuda_compile.py tests/test_cuda_host_math.py} 2>&1 | tee "$OUT/tests.log" | tail -60
fi
if [[ $what == *tune* ]]; then
  timeout ${TUNE_TIMEOUT:-200} python3 bench/tune_gpu.py --out "$OUT/tune.json" --sizes ${TUNE_SIZES:-256M,GPT2} 2>&1 | tee "$OUT/tune.log" | tail -40
fi
if [[ $what == *bench* ]]; then
  (cd bench && timeout ${BENCH_TIMEOUT:-300} python3 -m pytest -q bench_gpu.py ${bench_k:+-k "$bench_k"} \
     --benchmark-json="$OUT/gpu.json" --benchmark-columns=median 2>&1 | tee "$OUT/bench.log" | tail -30)
  [ -f "$OUT/gpu.json" ] && python3 -c "import json,sys; [print(b[\"name\"], {k: (round(v,4) if isinstance(v,float) else v) for k,v in b[\"extra_info\"].items() if k in (\"ms_per_step\",\"gb_per_s\",\"fraction_of_ceiling\")}) for b in json.load(open(sys.argv[1]))[\"benchmarks\"]]" "$OUT/gpu.json"
fi
