"""The `verl` reward (verl's own data_source dispatcher) and the `math` reward on verl-format rows.

The rows are built like verl's examples/data_preprocess/gsm8k.py output (prompt, data_source
"openai/gsm8k", ability, reward_model {style: rule, ground_truth}, extra_info), written to Parquet and
read back through posttrain's dataset loader, then scored through the reward paths runs and
`posttrain score` use.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from posttrain.data import load_prompt_rows
from posttrain.loops.run import reward_sample
from posttrain.rewards_runner import RewardFn, score_chunk
from rewards import call_reward, load_reward

GSM8K_INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."


def verl_row(data_source: str, question: str, ground_truth: str, index: int) -> dict:
    return {"data_source": data_source,
            "prompt": [{"role": "user", "content": f"{question} {GSM8K_INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": ground_truth},
            "extra_info": {"split": "test", "index": index, "answer": f"... #### {ground_truth}", "question": question}}


# (row, completion, verl's expected score)
CASES = [
    (verl_row("openai/gsm8k", "Natalia sold 48 clips in April and half as many in May. How many in all?", "72", 0),
     "In May she sold 48/2 = 24 clips, so 48+24 = 72 in all.\n#### 72", 1.0),
    (verl_row("openai/gsm8k", "Weng earns $12 an hour. How much for 50 minutes?", "10", 1),
     "12/60 = 0.2 per minute, 0.2*50 = 10.\n#### 11", 0.0),
    (verl_row("openai/gsm8k", "How much did Betty spend?", "1000", 2),
     "She spent $1,000 in total.\n#### 1,000", 1.0),  # verl's gsm8k drops commas
    (verl_row("lighteval/MATH", "What is 1/2 + 1/4?", r"\frac{3}{4}", 3), r"So it is $\boxed{\frac{3}{4}}$.", 1.0),
]


@pytest.fixture(scope="module")
def parquet_rows(tmp_path_factory):
    import pandas as pd
    path = tmp_path_factory.mktemp("verl") / "test.parquet"
    pd.DataFrame([row for row, _, _ in CASES]).to_parquet(path)
    return load_prompt_rows([str(path)])


@pytest.mark.unit
def test_verl_rows_score_as_in_verl_through_the_run_reward_path(parquet_rows):
    samples = [reward_sample(row, completion) for row, (_, completion, _) in zip(parquet_rows, CASES)]
    results = score_chunk(RewardFn("verl", 1.0, (), None),
                          [(s["data_source"], s["solution"], s["ground_truth"], s["extra_info"]) for s in samples])
    assert [r.score for r in results] == [expected for _, _, expected in CASES]
    assert all(r.failure is None for r in results)


@pytest.mark.unit
def test_math_reward_reads_verl_gsm8k_answers(parquet_rows):
    # posttrain's own `math` reward on the same rows: GSM8K's "#### 72" is a final answer.
    fn = load_reward("math")
    scores = [call_reward(fn, row["data_source"], completion, row["reward_model"]["ground_truth"], row["extra_info"]).score
              for row, (_, completion, _) in zip(parquet_rows, CASES)]
    assert scores == [expected for _, _, expected in CASES]


@pytest.mark.unit
def test_verl_dict_results_keep_their_details():
    outcome = call_reward(load_reward("verl"), "math_dapo", "so\nAnswer: 5", "5", None)
    assert outcome.score == 1.0 and outcome.failure is None
    assert outcome.details["acc"] is True and outcome.details["pred"] == "5"


@pytest.mark.unit
def test_unknown_data_source_is_a_counted_zero_not_a_crash():
    outcome = call_reward(load_reward("verl"), "my/unknown_source", "#### 5", "5", None)
    assert outcome.score == 0.0 and outcome.failure == "unknown_data_source"


@pytest.mark.unit
@pytest.mark.parametrize("returned, score, failure", [
    (True, 1.0, None), (0, 0.0, None), (0.5, 0.5, None), ({"score": 1.0, "acc": True}, 1.0, None),
    # the project's one set of rules for what a reward returns (rewards.base.normalise_result)
    (math.nan, 0.0, "non_finite"), ({"acc": True}, 0.0, "bad_result:dict_without_score"),
    ("1.0", 0.0, "bad_result:str"), (object(), 0.0, "bad_result:object"),
])
def test_verl_results_are_normalised(monkeypatch, returned, score, failure):
    import rewards.verl_reward as verl_reward
    monkeypatch.setattr(verl_reward, "default_compute_score", lambda *args, **kwargs: returned)
    result = verl_reward.compute_score("openai/gsm8k", "#### 5", "5")
    assert result["score"] == score and result.get("failure") == failure


@pytest.mark.unit
def test_an_exception_inside_verl_is_a_counted_zero(monkeypatch):
    import rewards.verl_reward as verl_reward

    def broken(*args, **kwargs):
        raise ValueError("bad ground truth")
    monkeypatch.setattr(verl_reward, "default_compute_score", broken)
    result = verl_reward.compute_score("openai/gsm8k", "#### 5", "5")
    assert result["score"] == 0.0 and result["failure"] == "exception:ValueError"
    assert "bad ground truth" in result["error"]


@pytest.mark.integration
def test_posttrain_score_with_reward_verl(parquet_rows, tmp_path):
    inputs, outputs = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with open(inputs, "w") as handle:
        for row, (_, completion, _) in zip(parquet_rows, CASES):
            handle.write(json.dumps({"completion": completion, "ground_truth": row["reward_model"]["ground_truth"],
                                     "data_source": row["data_source"], "extra_info": row["extra_info"]}) + "\n")
        handle.write(json.dumps({"completion": "#### 5", "ground_truth": "5", "data_source": "nobody/knows"}) + "\n")
    done = subprocess.run([sys.executable, "-m", "posttrain.score", "--reward", "verl", str(inputs), "-o", str(outputs),
                           "--workers", "1", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    scored = [json.loads(line) for line in open(outputs)]
    assert [r["score"] for r in scored] == [expected for _, _, expected in CASES] + [0.0]
    assert scored[-1]["details"]["failure"] == "unknown_data_source"
    assert "unknown_data_source 1" in done.stderr
