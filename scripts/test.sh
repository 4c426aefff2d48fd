#!/usr/bin/env bash
# Set up, fetch the offline reference model, and run the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python scripts/prepare_reference_model.py --out models
python -m pytest -q -ra "$@"
