#!/usr/bin/env bash
# .venv-llamacpp: llama-cpp-python 0.3.36 for scripts/bench_gguf.py: llama.cpp's own quantizer
# (llama_model_quantize) and its evaluation of GGUF files (scripts/llamacpp_tool.py).
# Not for CI.
#
# * After scripts/build_llamacpp_tools.sh (build/llamacpp/bin/libllama.so exists): the package is installed from
#   the same source distribution without building its library (CMake LLAMA_BUILD=OFF, seconds); llamacpp_tool.py
#   then loads the tools' libraries (LLAMA_CPP_LIB_PATH=build/llamacpp/bin), so llama.cpp is compiled once and the
#   command-line tools and the Python binding are the same llama.cpp.
# * Otherwise: pip builds llama.cpp from the PyPI source distribution (about 10 to 20 minutes on 2 cores),
#   CPU-only and generic x86-64 with AVX2 (the same flags as build_llamacpp_tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
PY=${PYTHON:-python3}
SDIST=build/llamacpp-src/llama_cpp_python-$VERSION.tar.gz
LIB=${LLAMACPP_BUILD_DIR:-build/llamacpp}/bin
[ -x .venv-llamacpp/bin/python ] || "$PY" -m venv .venv-llamacpp
. .venv-llamacpp/bin/activate
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
if [ -f "$LIB/libllama.so" ] && [ -f "$SDIST" ]; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install -q "$SDIST" "numpy<3"
    export LLAMA_CPP_LIB_PATH="$PWD/$LIB"
else
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_OPENSSL=OFF -DGGML_OPENMP=OFF}"
    pip install -q "llama-cpp-python==$VERSION" "numpy<3"
fi
python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'library:', llama_cpp.llama_cpp._base_path)"
