# Sourced by main.sh and test.sh: set up .venv, activate it, go offline, build the reference model.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python scripts/prepare_reference_model.py --out models
