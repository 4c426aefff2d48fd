#!/usr/bin/env bash
# Set up, build the offline reference model, quantize it (GPTQ W4A16 g128 sym) and print PPL-16K before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python scripts/prepare_reference_model.py --out models
python scripts/quantize_reference.py --overwrite "$@"
