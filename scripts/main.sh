#!/usr/bin/env bash
# Set up, build the offline reference model, quantize it (GPTQ W4A16 g128 sym) and print PPL-16K before/after.
set -euo pipefail
. "$(dirname "$0")/env.sh"
python scripts/quantize_reference.py --overwrite "$@"
