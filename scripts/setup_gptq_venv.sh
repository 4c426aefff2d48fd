#!/usr/bin/env bash
# .venv-gptq: transformers' own GPTQ path (optimum + gptqmodel) on CPU, for scripts/check_gptq_interop.py.
# Not for CI (heavy; gptqmodel builds from source). gptqmodel 7.7 declares torch>=2.14.1 (CUDA wheels);
# it is installed with --no-deps on the CPU torch 2.13.0 and runs there (its CPU kernel JIT-compiles
# on first use, ~90 s on 2 cores, cached in ~/.cache/gptqmodel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-gptq/bin/python ] || "$PY" -m venv .venv-gptq
. .venv-gptq/bin/activate
pip install -q "torch==2.13.0"
pip install -q "transformers==5.24.0" "optimum==2.3.0" accelerate safetensors requests \
    datasets defuser device-smi dill logbar pillow protobuf pyarrow pypcre threadpoolctl tokenicer tokenizers
BUILD_CUDA_EXT=0 pip install -q --no-deps "gptqmodel==7.7.0" "torchao==0.18.0"
python -c "import torch, transformers, optimum, gptqmodel; print('torch', torch.__version__, '| transformers', transformers.__version__, '| gptqmodel', gptqmodel.__version__)"
