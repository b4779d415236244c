"""Rollout and trainer speed with images and 8-frame videos vs text-only prompts on the same model; the vision
encoder's share of the engine's and the trainer's time; bytes per sample (files on disk, what the engine
receives, the trainer's pixels).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_vl.py [--model posttrain/toy/assets/toy-vl] [--prompts 32]

Prompts: the shipped recipes/data/vl-ground (one 96x96 image), vl-video (8 frames of 64x64 at 2 fps) rows, and
the same rows' questions with the media mark removed (text-only). n=4 samples each, up to 32 tokens, T = 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _encoder_timer(engine):
    """Wrap the in-process engine's vision tower so that its forward time is summed (seconds)."""
    worker = engine.llm.llm_engine.model_executor.driver_worker.worker
    return _timed_forward(worker.model_runner.get_model().visual)


def _timed_forward(visual):
    spent = {"s": 0.0, "calls": 0}
    forward = visual.forward

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        spent["s"] += time.perf_counter() - start
        spent["calls"] += 1
        return out
    visual.forward = timed
    return spent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="posttrain/toy/assets/toy-vl")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()

    import posttrain.vl  # noqa: F401
    from transformers import AutoProcessor

    from posttrain.data import load_prompt_rows
    from posttrain.rollout.engine import RolloutEngine
    from posttrain.vl.inputs import MultimodalPrompt, encode_vl_prompt, processor_pixels
    from posttrain.vl.media import multimodal_prompt

    processor = AutoProcessor.from_pretrained(args.model)
    tokenizer = processor.tokenizer
    sets = {}
    for kind, folder in (("image", "vl-ground"), ("video", "vl-video")):
        rows = load_prompt_rows([f"recipes/data/{folder}/train.jsonl"])[:args.prompts]
        sets[kind] = (rows, [multimodal_prompt(tokenizer, r) for r in rows])
    text_rows = sets["image"][0] + sets["video"][0]
    text_prompts = [encode_vl_prompt(tokenizer, [{"role": "user", "content": r["prompt"][0]["content"]
                                                   .replace("<image>", "").replace("<video>", "")}])
                    for r in text_rows[:args.prompts]]
    sets["text"] = (text_rows[:args.prompts], text_prompts)

    engine = RolloutEngine(args.model, max_model_len=512, engine_kwargs={"limit_mm_per_prompt": {"image": 2, "video": 1}})
    spent = _encoder_timer(engine)
    engine.generate([sets["image"][1][0], sets["video"][1][0], text_prompts[0]], n=1, temperature=1.0, top_p=1.0,
                    max_tokens=4, seeds=[0, 1, 2])   # warm-up
    results, samples = {}, {}
    for kind in ("text", "image", "video"):
        rows, prompts = sets[kind]
        engine.llm.reset_prefix_cache()          # every set starts cold: no KV or vision embedding reused
        engine.llm.llm_engine.reset_encoder_cache()
        spent["s"], spent["calls"] = 0.0, 0
        start = time.perf_counter()
        out = engine.generate(prompts, n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens,
                              seeds=list(range(len(prompts))))
        wall = time.perf_counter() - start
        generated = sum(len(s["token_ids"]) for group in out for s in group)
        expanded = [len(engine.prompt_token_logprobs(p)) + 1 for p in prompts[:4]]   # prompt length as the engine sees it
        entry = {"prompts": len(prompts), "samples": len(prompts) * args.n, "generated_tokens": generated,
                 "wall_s": round(wall, 3), "generated_tokens_per_s": round(generated / wall, 1),
                 "prompt_tokens_mean": round(sum(expanded) / len(expanded), 1),
                 "vision_encoder_s": round(spent["s"], 3), "vision_encoder_share": round(spent["s"] / wall, 3)}
        if kind != "text":
            files = [m for r in rows for m in (r.get("images") or [v["video"] for v in r.get("videos") or []])]
            raw = [sum(im.width * im.height * 3 for im in p.images) + sum(v.frames.nbytes for v in p.videos)
                   for p in prompts]
            pixels = [sum(t.numel() * t.element_size() for k, t in processor_pixels(processor, p.images, p.videos).items()
                          if k.startswith("pixel_values")) for p in prompts[:8]]
            entry.update({"file_bytes_per_sample": round(sum(os.path.getsize(f) for f in files) / len(rows)),
                          "engine_payload_bytes_per_sample": round(sum(raw) / len(raw)),
                          "trainer_pixel_bytes_per_sample": round(sum(pixels) / len(pixels))})
        results[kind] = entry
        samples[kind] = ([q for q in prompts for _ in range(args.n)],
                         [s["token_ids"] for group in out for s in group])
        print(kind, json.dumps(entry), flush=True)
    del engine
    for kind, entry in _trainer_rates(args.model, samples).items():
        results[kind].update(entry)
        print(kind, "trainer", json.dumps(entry), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    assert isinstance(sets["image"][1][0], MultimodalPrompt)


def _trainer_rates(model_path: str, samples: dict) -> dict:
    """The trainer (TrainerRank, world size 1, the vl-quickstart recipe's settings) on the sampled responses of
    each set: π_old log-probs (forward) and one GSPO mini-batch step (forward + backward + AdamW), timed; tokens =
    expanded prompt + response tokens, as the trainer's model sees them."""
    import numpy as np

    from posttrain.config import load_recipe
    from posttrain.loops.algorithms import make_algorithm
    from posttrain.trainer.worker import TrainerRank, free_port, trainer_settings
    from posttrain.vl.inputs import MultimodalPrompt

    recipe = load_recipe("recipes/vl-quickstart.yaml", [f"model.path={os.path.abspath(model_path)}"])
    rank = TrainerRank(0, 1, trainer_settings(recipe, make_algorithm(recipe).objective()))
    rank.setup("127.0.0.1", free_port())
    spent = _timed_forward(rank.model.model.visual)
    rates = {}
    for kind, (prompts, responses) in samples.items():
        mm = [p if isinstance(p, MultimodalPrompt) else None for p in prompts]
        ids = [list(p.token_ids) if isinstance(p, MultimodalPrompt) else list(p) for p in prompts]
        if not any(mm):
            mm = None
        expanded = rank.pack(ids[:8], responses[:8], mm[:8] if mm else None)[1]   # prompt lengths after expansion
        tokens = sum(len(r) for r in responses) + sum(expanded) * len(ids) // len(expanded)
        spent["s"] = 0.0
        start = time.perf_counter()
        old = rank.compute_logprobs(ids, responses, mm)
        forward_s = time.perf_counter() - start
        encoder_forward_s = spent["s"]
        T = max(map(len, responses))
        arrays = {"old_logprobs": np.stack([np.pad(np.asarray(o, np.float32), (0, T - len(o))) for o in old]),
                  "advantages": np.random.default_rng(0).standard_normal(len(ids)).astype(np.float32)}
        spent["s"] = 0.0
        start = time.perf_counter()
        rank.train_minibatch(ids, responses, arrays, len(ids), mm)
        step_s = time.perf_counter() - start
        rates[kind] = {"trainer_tokens": tokens, "trainer_forward_tokens_per_s": round(tokens / forward_s, 1),
                       "trainer_step_tokens_per_s": round(tokens / step_s, 1),
                       "trainer_vision_share_forward": round(encoder_forward_s / forward_s, 3),
                       "trainer_vision_share_step": round(spent["s"] / step_s, 3)}
    return rates


if __name__ == "__main__":
    main()
