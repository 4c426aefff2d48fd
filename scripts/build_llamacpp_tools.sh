#!/usr/bin/env bash
# llama.cpp's command-line tools for scripts/bench_gguf.py and scripts/bench_llamacpp_speed.py:
# llama-imatrix (importance matrix), llama-quantize (with --imatrix) and llama-bench, plus the shared
# libraries (libllama.so, libggml*.so) that llama-cpp-python can load instead of its own
# (scripts/setup_llamacpp_venv.sh installs it without building when these exist).
#
# Built from the llama.cpp sources vendored in the llama-cpp-python==0.3.36 source distribution, so the
# tools and the Python binding are the same llama.cpp. CPU-only, generic x86-64 with AVX2 (no -march=native),
# no curl/OpenSSL, no OpenMP, 2 build jobs. Output: build/llamacpp/bin (build/ is gitignored).
# NATIVE=1: llama.cpp's own default, -march=native (AVX-512/VNNI where the CPU has them), into
# build/llamacpp-native: what a user who builds llama.cpp on this machine runs; for speed numbers only. Measured
# 2026-12-06 on the KVM Intel Xeon (AVX-512, AMX): the native llama-bench dies with SIGILL, so the tables use AVX2.
# Not for CI: compiling takes about 10 to 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
SRC=build/llamacpp-src
NATIVE=${NATIVE:-0}
if [ "$NATIVE" = 1 ]; then
    OUT=${LLAMACPP_BUILD_DIR:-build/llamacpp-native}
    ISA=(-DGGML_NATIVE=ON)
else
    OUT=${LLAMACPP_BUILD_DIR:-build/llamacpp}
    ISA=(-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
fi
JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
PY=${PYTHON:-python3}

mkdir -p "$SRC"
SDIST="$SRC/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$SRC"
fi
[ -d "$SRC/llama_cpp_python-$VERSION" ] || tar xzf "$SDIST" -C "$SRC"
LLAMA="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"

cmake -S "$LLAMA" -B "$OUT" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON "${ISA[@]}" -DGGML_OPENMP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON
cmake --build "$OUT" -j "$JOBS" --target llama-imatrix llama-quantize llama-bench
ls "$OUT"/bin
"$OUT"/bin/llama-quantize --help 2>&1 | head -n 3 || true
