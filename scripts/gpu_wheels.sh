#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh needs on the GPU machine beyond its image (run here, where pip reaches the package
# registry; never in CI): datasets (two GPU tests read calibration text through it) and llm-compressor 0.14 with what
# its import needs there (the side-by-side GPTQ of the same layer, scripts/bench_llmcompressor_layer.py).
# The image has Python 3.12, torch 2.11, transformers 5.17 (llm-compressor 0.14 pins transformers <= 5.17).
# Then: the device tool's run with carry [".whl"] and `bash scripts/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "datasets==5.2.0" "dill==0.4.0" "multiprocess==0.70.18" \
  "llmcompressor==0.14.0.1" "compressed-tensors==0.19.0" "auto-round==0.15.1" "loguru==0.7.3" \
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.7.0" "typing-inspection==0.4.4" 2>&1 \
  | grep -v "WARNING: Location" || true
du -sh .whl && ls .whl
