#!/usr/bin/env bash
# Set up, build the offline reference model, and run the whole test suite (slow tests included).
set -euo pipefail
. "$(dirname "$0")/env.sh"
python -m pytest -q -ra "$@"
