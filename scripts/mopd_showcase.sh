#!/usr/bin/env bash
# The 13-teacher showcase of docs/mopd.md, end to end on this 2-core machine (about an hour and a quarter):
#   1. the 13 GSPO teachers from the multi-domain toy base      (scripts/toy_teachers.sh)
#   2. MOPD of all 13 into the base                             (recipes/mopd-13.yaml)
#   3. baseline: sequential single-domain RL, the teachers' budget  (recipes/baselines/sequential-13.yaml)
#   4. baseline: one mixed-domain RL run, the same budget           (recipes/baselines/mixed-13.yaml)
#   5. the table and docs/mopd_showcase.png                     (scripts/mopd_showcase_table.py)
# Every step skips what is already finished, so an interrupted showcase is continued by running it again.
set -euo pipefail
cd "$(dirname "$0")/.."
PT=".venv/bin/posttrain"
bash scripts/toy_teachers.sh
run() {   # recipe, run dir: a finished run is left alone; an unfinished one resumes from its last checkpoint
  if [ -f "$2/summary.json" ]; then echo "$2: finished"; return; fi
  $PT run "$1" --run-dir "$2" --no-progress
}
run recipes/mopd-13.yaml runs/toy/mopd-13
# The sequential baseline's data: each domain's first 30 steps x 16 prompts of rows, in the teachers' order.
for d in add tspan box sub mul max count frac solve think tool ocr code; do head -n 480 "recipes/data/$d/train.jsonl"
done > recipes/data/sequential-13.jsonl
run recipes/baselines/sequential-13.yaml runs/toy/baselines/sequential-13
run recipes/baselines/mixed-13.yaml runs/toy/baselines/mixed-13
.venv/bin/python scripts/mopd_showcase_table.py --runs runs/toy
