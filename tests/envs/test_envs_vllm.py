"""Multi-turn rollouts through a real vLLM engine (RolloutEngine, in process) on the committed toy base: the ids the
trainer gets are the ids the engine sampled, turn after turn, and the engine's own scoring of the final sequence
gives back the sampling log-probs exactly where the loss mask is 1."""
import os

import pytest

from envs import ToolEnv, tool
from posttrain.rollout.multiturn import (ChatRenderer, MultiTurnLimits, batch_metrics, engine_generate_fn,
                                         render_trajectory, run_multiturn)
from posttrain.toy.build import CHAT_TEMPLATE

pytestmark = pytest.mark.integration
MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "posttrain/toy/assets/toy-base")


class MustCall(ToolEnv):
    """The toy base answers arithmetic without tools; every answer is refused (missing_tool_call), so each
    trajectory runs turn after turn with error observations in between until max_turns."""

    @tool
    def add(self, a: int, b: int) -> str:
        """Add two integers."""
        return str(a + b)


def test_multiturn_token_exact_through_vllm():
    from transformers import AutoTokenizer

    from posttrain.rollout.engine import RolloutEngine
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    engine = RolloutEngine(MODEL, max_model_len=1024, seed=0)
    prompts_seen = []
    engine_generate = engine_generate_fn(engine.generate, temperature=1.0, top_p=1.0)

    def generate(prompts, seeds, max_tokens):
        prompts_seen.extend(map(list, prompts))
        return engine_generate(prompts, seeds, max_tokens)

    questions = ["What is 47+8?", "What is 23+9?", "What is 61+5?", "What is 88+7?"]
    envs = [MustCall({"prompt": [{"role": "user", "content": q}]}, require_tool_call=True) for q in questions]
    renderer = ChatRenderer(tokenizer, chat_template=CHAT_TEMPLATE)
    trajs = run_multiturn(envs, generate, renderer, seeds=[11, 12, 13, 14],
                          limits=MultiTurnLimits(max_turns=3, max_tokens_per_turn=24, max_context_tokens=1024))

    for traj in trajs:
        full = traj.prompt_ids + traj.completion_ids
        assert traj.num_turns >= 2 and traj.errors.get("missing_tool_call", 0) >= 1, render_trajectory(traj, tokenizer)
        # every engine call for this trajectory got exactly its ids so far
        mine = [p for p in prompts_seen if p[:len(traj.prompt_ids)] == traj.prompt_ids and full[:len(p)] == p]
        assert len(mine) == traj.num_turns
        # the observation after a finished turn starts right after the sampled <|im_end|>, separator kept
        assert "<|im_end|>\n<|im_start|>user\nError: answer only after calling a tool" in traj.text
        # the engine's own log-probs of the final sequence equal the sampling log-probs on the policy's tokens
        scored = engine.prompt_token_logprobs(full)          # log p(x_t | x_<t), t >= 1
        offset = len(traj.prompt_ids) - 1
        for t, (m, lp) in enumerate(zip(traj.loss_mask, traj.logprobs)):
            if m:
                assert abs(scored[offset + t] - lp) < 1e-3, (t, scored[offset + t], lp)
            else:
                assert lp == 0.0
    metrics = batch_metrics(trajs)
    assert metrics["env/tool_errors/missing_tool_call"] >= 1 and metrics["env/turns_mean"] >= 2
