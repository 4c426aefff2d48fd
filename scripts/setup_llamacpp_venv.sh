#!/usr/bin/env bash
# .venv-llamacpp: llama-cpp-python (llama.cpp built from its PyPI source distribution) for
# scripts/bench_gguf.py: llama.cpp's own quantizer (llama_model_quantize) and its evaluation of GGUF files.
# Not for CI: the build compiles llama.cpp from source (about 10 to 20 minutes on 2 cores).
# The build is CPU-only and generic x86-64 with AVX2 so the venv runs on every machine of this class.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-llamacpp/bin/python ] || "$PY" -m venv .venv-llamacpp
. .venv-llamacpp/bin/activate
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF}"
pip install -q "llama-cpp-python==0.3.36" "numpy<3"
python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
