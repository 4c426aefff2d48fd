#!/usr/bin/env bash
# Set up, build the offline reference model, then run the offline default recipe with the CLI:
# SmolLM2-135M GPTQ W4A16 g128 on the bundled WikiText-2, printing PPL-16K before/after.
# It replaces out/smollm2-135m-gptq-w4a16-g128 from an earlier run (--overwrite); extra arguments go to
# `hfquant run` (e.g. --resume after an interrupted run, --set quantization.bits=3).
# -q (no progress bars) is an option of `hfquant` itself, before the command: `hfquant -q run RECIPE`.
set -euo pipefail
. "$(dirname "$0")/env.sh"
hfquant run recipes/smollm2-135m-gptq-w4a16-g128.yaml --overwrite "$@"
