#!/usr/bin/env bash
# The README's main command: set up (when needed), then run GSPO on the toy arithmetic task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/posttrain run recipes/quickstart.yaml --run-dir "${RUN_DIR:-runs/quickstart}" "$@"
