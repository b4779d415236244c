"""Rollout speed with images and 8-frame videos vs text-only prompts on the same model; the vision encoder's
share of the engine's time; bytes per sample (files on disk, what the engine receives, the trainer's pixels).

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
    model = worker.model_runner.get_model()
    visual = model.visual
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
    results = {}
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
        print(kind, json.dumps(entry), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    assert isinstance(sets["image"][1][0], MultimodalPrompt)


if __name__ == "__main__":
    main()
