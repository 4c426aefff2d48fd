#!/usr/bin/env bash
# The one prepared GPU check (issues 7 and 17), under 8 minutes on an H100/H200. Run it on the lent GPU machine
# from the repository root (the `device` tool's `run`, e.g. `bash scripts/gpu_check.sh`); it writes logs and
# tables under $OUT. The GPU image has torch, transformers, accelerate and triton but no datasets: every test
# run here passes its calibration windows directly, so no wheels need to travel.
#   1. every test marked `gpu`: GPTQ / RTN / SmoothQuant / bits auto on CUDA in bf16 and fp16 on a tiny model,
#      compared with the same run on the CPU (codes agreeing on >= 99% of weights, logits close), from_pretrained
#      with device_map="cuda", and the compiled Triton kernels against their references;
#   2. GPTQ W4 g128 of one Llama-3-8B-shaped layer with 128 x 2048 calibration tokens (seconds per layer next to
#      llm-compressor's published 23.3 s);
#   3. the kernel benchmark.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
HFQUANT_TRITON_AUTOTUNE=0 timeout 200 python3 -m pytest -q -ra -p no:cacheprovider tests/test_gpu.py tests/test_triton_kernels.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 150 python3 scripts/bench_gpu_layer.py --out "$OUT" 2>&1 | tee "$OUT/gpu_layer.log"
timeout 110 python3 scripts/bench_kernels.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log"
