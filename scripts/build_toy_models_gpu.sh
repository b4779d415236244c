#!/usr/bin/env bash
# Builds, on one GPU machine, the toy models whose supervised warm-ups take minutes there and hours on 2 CPU cores,
# all at once (each is tiny; they share the GPU), and measures each one's held-out competence.
#
#   bash scripts/build_toy_models_gpu.sh OUT_DIR [agent,vl]
#
# OUT_DIR/toy-agent           the agent base (habit rate 0.5): recipes/agent-quickstart.yaml's student
# OUT_DIR/toy-agent-teacher   the same domains without the habit (rate 0): the tool-use teacher of agent MOPD
# OUT_DIR/toy-vl              the VL student (habit rate 0.5, 1800 steps): recipes/vl-quickstart.yaml
# OUT_DIR/toy-vl-image        image teacher (ground, count, ocr; no habit) for cross-modal MOPD
# OUT_DIR/toy-vl-video        video teacher (video; no habit) for cross-modal MOPD
# Logs: OUT_DIR/*.log (the agent logs end with per-domain multi-turn rewards, the VL logs with evaluate_vl's).
# Needs torch, transformers, tokenizers, PIL and torchvision (no vLLM, no Ray). PYTHONPATH = the repository.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
vl() {  # vl NAME DOMAINS HABIT_RATE SFT_STEPS
  python - "$OUT/$1" "$2" "$3" "$4" <<'PY'
import json, sys, time
from posttrain.vl import toy
out, domains, habit, steps = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3]), int(sys.argv[4])
start = time.time()
info = toy.build_toy_vl(out, domains=domains, sft_steps=steps, habit_rate=habit, device="cuda")
print("build", json.dumps(info), f"{time.time() - start:.0f}s", flush=True)
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(out)
print("eval", json.dumps(toy.evaluate_vl(model, AutoProcessor.from_pretrained(out), list(toy.VL_DOMAINS), n=32,
                                        device="cuda")), flush=True)
PY
}
WHAT=${2:-agent,vl}   # the VL warm-ups run at 2-4 steps/s there (the step is host-bound): about 5 minutes each, run alone
if [[ $WHAT == *agent* ]]; then
  python benchmarks/bench_toy_agent_base.py "$OUT/toy-agent" 2400 0.5 cuda >"$OUT/toy-agent.log" 2>&1 &
  python benchmarks/bench_toy_agent_base.py "$OUT/toy-agent-teacher" 2400 0.0 cuda >"$OUT/toy-agent-teacher.log" 2>&1 &
fi
if [[ $WHAT == *vl* ]]; then
  vl toy-vl ground,count,ocr,video 0.5 1800 >"$OUT/toy-vl.log" 2>&1 &
  vl toy-vl-image ground,count,ocr 0.0 1200 >"$OUT/toy-vl-image.log" 2>&1 &
  vl toy-vl-video video 0.0 300 >"$OUT/toy-vl-video.log" 2>&1 &
fi
wait
tail -n 12 "$OUT"/*.log
# What is committed under posttrain/toy/assets (toy-agent, toy-agent-teacher, toy-vl, toy-vl-teacher-image,
# toy-vl-teacher-video) was built by this script on one H200, 2026-12-01; the logs are in benchmarks/toy_builds/.
