#!/usr/bin/env bash
# The one prepared GPU check (issues 7, 17 and 35); its steps' time limits add to about 13 minutes (limits, not durations). Run it on the lent GPU machine
# from the repository root (the `device` tool's `run`, e.g. `bash scripts/gpu_check.sh`); it writes logs and
# tables under $OUT.
#   1. every test marked `gpu`: GPTQ / RTN / SmoothQuant / bits auto on CUDA in bf16 and fp16 on a tiny model,
#      compared with the same run on the CPU (the first module's codes >= 99% equal, logits close, the GPU's model
#      as accurate as the CPU's; whole-model code agreement printed), one GPTQ solve on CUDA vs CPU from the same
#      Hessian (>= 99.5% of codes equal), from_pretrained with device_map="cuda", a recipe with `device: cuda`,
#      and the compiled Triton kernels against their references;
#      the CUDA paths (torch's int4 tinygemm, the timed choice) and the fused GPTQ column loop against PyTorch's;
#   2. GPTQ W4 g128 of one Llama-3-8B-shaped layer with 128 x 2048 calibration tokens, with the fused column loop and
#      with PyTorch's, and with min-max grids (seconds per layer next to llm-compressor's published 23.3 s);
#   3. the kernel benchmark (its W4A16 / W8A8 rows through the dispatch: tinygemm, Triton, cuBLASLt).
#   4. where llm-compressor imports, the same layer through its GPTQ (scripts/bench_llmcompressor_layer.py).
# `datasets` and llm-compressor are not on the GPU image: `bash scripts/gpu_wheels.sh` here fetches their wheels into
# .whl; carry it (without it the two tests that read calibration text through datasets are skipped, and step 4 is).
# Everything printed goes to $OUT/gpu_check.log.
set -o pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$LOG"
if [ -d .whl ]; then  # the wheels scripts/gpu_wheels.sh fetched (datasets, llm-compressor and its needs), carried
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2 | tee -a "$LOG"
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"
HFQUANT_TRITON_AUTOTUNE=0 timeout 240 python3 -m pytest -q -s -ra -p no:cacheprovider tests/test_gpu.py \
  tests/kernels/test_triton_kernels.py tests/kernels/test_cuda_paths.py tests/core/test_gptq_fused.py 2>&1 | tee -a "$LOG"
# GPTQ of the layer: fused column loop (the default on CUDA) against the PyTorch loop, then min-max grids
for run in "--loop fused" "--loop torch" "--observer minmax"; do
  timeout 100 python3 scripts/bench_gpu_layer.py $run --out "$OUT" 2>&1 | tee -a "$LOG"
done
if python3 -c "import llmcompressor" 2>/dev/null; then  # the same layer through llm-compressor's GPTQ, side by side
  timeout 150 python3 scripts/bench_llmcompressor_layer.py --out "$OUT" 2>&1 | tail -8 | tee -a "$LOG"
else
  echo "llm-compressor not importable here (carry .whl from scripts/gpu_wheels.sh): no side-by-side run" | tee -a "$LOG"
fi
timeout 110 python3 scripts/bench_kernels.py --device cuda --out "$OUT" 2>&1 | tee -a "$LOG"
