#!/usr/bin/env bash
# The one prepared GPU check (issue 7): compiled Triton kernels against the references, then the kernel
# benchmark. Run on the lent GPU machine from the repository root; writes logs and tables under $OUT.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
HFQUANT_TRITON_AUTOTUNE=0 timeout 120 python3 -m pytest -q -ra -p no:cacheprovider tests/test_triton_kernels.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 270 python3 scripts/bench_kernels.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log"
