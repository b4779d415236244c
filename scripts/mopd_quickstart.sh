#!/usr/bin/env bash
# The MOPD quickstart on a fresh clone (sets up the environment first when needed):
#   1. three GSPO teachers from the committed 13-domain toy base: add, tspan, box   (about 5 minutes here)
#   2. multi-teacher on-policy distillation of the three into that base            (about 3 minutes here)
# Prints the held-out reward before → after and the reverse KL to the teachers (first → last steps); the curves
# are in runs/mopd-quickstart/reward_curve.png. Re-running skips the teachers that exist and resumes the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh   # quick when the environment is already there
DOMAINS="add tspan box" bash scripts/toy_teachers.sh
.venv/bin/posttrain run recipes/mopd-quickstart.yaml --run-dir runs/mopd-quickstart
