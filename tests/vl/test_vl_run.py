"""Vision-language GSPO through the one loop: image and video prompts to vLLM with their media, trainer log-probs
with the pixels (the canary compares them on an image prompt after every sync), rewards per source, exact resume."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VL = ["recipes/vl-quickstart.yaml", "rollout.prompts_per_step=4", "rollout.n=4", "data.eval_every=0",
      "checkpoint.every=1"]


def _small_eval_set(tmp_path) -> str:
    """4 held-out rows of each source (media paths made absolute: they are relative to the data file's folder)."""
    rows = []
    for source in ("vl-ground", "vl-video"):
        folder = os.path.join(REPO, "recipes", "data", source)
        for line in open(os.path.join(folder, "eval.jsonl")).readlines()[:4]:
            row = json.loads(line)
            for key in ("images", "videos"):
                if key in row:
                    row[key] = [os.path.join(folder, item) for item in row[key]]
            rows.append(row)
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"data.eval_files=[{path}]"


def _run(args, run_dir):
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", *args, "--run-dir", run_dir, "--no-progress"],
                         cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr[-3000:]


def test_vl_gspo_run_keeps_engine_and_trainer_in_sync_and_resumes_exactly(tmp_path):
    whole, extended = str(tmp_path / "whole"), str(tmp_path / "extended")
    vl = [*VL, _small_eval_set(tmp_path)]
    _run([*vl, "total_steps=3"], whole)
    records = [json.loads(line) for line in open(os.path.join(whole, "metrics.jsonl"))]
    steps = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        # engine (vLLM, media as multi_modal_data) vs trainer (HF model, expanded ids + pixels) on an image prompt
        assert r["rollout/canary_max_abs_diff"] < 2e-3
        assert "reward/component/iou" in r and "reward/component/tiou" in r
    evals = [r for r in records if "eval/reward/mean" in r]
    assert {"eval/reward/by_source/toy-vl/ground", "eval/reward/by_source/toy-vl/video"} <= set(evals[0])
    _run([*vl, "total_steps=2"], extended)
    _run([*vl, "total_steps=3", "--allow-change", "total_steps"], extended)
    a = load_file(os.path.join(whole, "final", "model.safetensors"))
    b = load_file(os.path.join(extended, "final", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "a VL run resumed from its checkpoint diverged"
    assert os.path.isfile(os.path.join(whole, "final", "processor_config.json"))   # final/ is a whole VLM folder
