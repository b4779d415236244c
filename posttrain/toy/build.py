"""Build the project's own tiny models: a BPE tokenizer trained on generated text, a Qwen3-architecture model
from a config, and a short supervised warm-up that gives it partial competence (so RL has signal).

    posttrain toy build --out posttrain/toy/assets/toy-base --domains add --sft-steps 300

No model hub is reachable here or in CI; everything is made from the toy task generators. The result is a
plain Hugging Face folder (config, tokenizer, model.safetensors) that transformers and vLLM load as is.
"""
from __future__ import annotations

import math
import os
import random

import torch

from posttrain.toy.tasks import AGENT_DOMAINS, DOMAINS, make_rows

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
                  "<tool_call>", "</tool_call>", "<answer>", "</answer>"]
# Tags that are single tokens but part of the response's TEXT (as in Qwen3: added, not special). A special token
# is dropped when a response is detokenised (vLLM's default skip_special_tokens), so a tag marked special would
# never reach the reward: "<think>26+26</think><answer>52</answer>" would arrive as "26+2652".
TEXT_TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "</answer>")
# Qwen-style chat template (no default system prompt). The generation prompt ends with "assistant\n".
# The template of the committed toy bases (toy-base, toy-base-13); it knows no tools.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# What newly built toy models get: the same text for prompts without tools (tests/envs/test_envs_domains.py checks it), and
# Qwen3's conventions for tools: the offered tools listed in a system turn (compactly, `name(args): description`,
# for a 1024-position model), calls as <tool_call>{"name": ..., "arguments": {...}}</tool_call> in the assistant's
# text (or given as OpenAI `tool_calls`), results as `tool` messages rendered as <tool_response> blocks inside
# one user turn.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n' }}{% endif %}"
    "{{ 'Tools:' }}{% for tool in tools %}{% set f = tool['function'] if 'function' in tool else tool %}"
    "{{ '\n' + f['name'] + '(' + (f['parameters']['properties'] | join(', ')) + '): ' + f['description'] }}"
    "{% endfor %}"
    "{{ '\nCall a tool as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>' + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>' + '\n' }}{% endif %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}{% set c = call['function'] if 'function' in call else call %}"
    "{{ '<tool_call>{\"name\": \"' + c['name'] + '\", \"arguments\": ' + (c['arguments'] if c['arguments'] is string else (c['arguments'] | tojson)) + '}</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>' + '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 512, *, special_tokens: list[str] = SPECIAL_TOKENS,
                    split_digits: bool = True):
    """Byte-level BPE, ChatML markup. `split_digits`: single-digit pre-tokenisation (digits never merge, so
    arithmetic stays learnable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok = Tokenizer.from_str(unmark_text_tags(tok.to_str()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def unmark_text_tags(tokenizer_json: str) -> str:
    """A tokenizer.json with TEXT_TAGS flagged as ordinary added tokens (same ids, kept when decoding)."""
    import json

    spec = json.loads(tokenizer_json)
    for added in spec["added_tokens"]:
        if added["content"] in TEXT_TAGS:
            added["special"] = False
    return json.dumps(spec, ensure_ascii=False)


def build_model(tokenizer, *, hidden_size: int = 256, layers: int = 2, seed: int = 0, intermediate_size: int | None = None,
                max_positions: int = 1024, vocab_size: int | None = None):
    """A randomly initialised Qwen3 causal LM sized for the CPU (head_dim 64: vLLM's CPU attention needs it).
    `vocab_size`: the embedding rows (default: the tokenizer's size rounded up to a multiple of 64)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    vocab = vocab_size or int(math.ceil(len(tokenizer) / 64) * 64)   # padded vocab, as real models do
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=hidden_size // 64, num_key_value_heads=max(1, hidden_size // 128),
        head_dim=64, max_position_embeddings=max_positions, tie_word_embeddings=True, rope_theta=10000.0,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None,
        torch_dtype="float32",
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def encode_example(tokenizer, messages: list[dict], response: str) -> tuple[list[int], list[int]]:
    """Segmented tokenisation: prompt (chat template) and response tokenised separately, then concatenated,
    so no BPE merge crosses the boundary — the same ids the rollout engine produces."""
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return list(prompt_ids), response_ids


def encode_demonstration(tokenizer, row: dict) -> tuple[list[int], list[int], list[int]]:
    """An agent row's multi-turn demonstration (extra_info.answer: assistant and tool messages) as
    (prompt ids, completion ids, loss mask), built exactly as a multi-turn rollout builds a trajectory
    (posttrain.rollout.multiturn): the prompt with the environment's tools, each assistant turn's text tokenised
    alone plus <|im_end|> (mask 1), each observation appended as the template's suffix (mask 0)."""
    from envs import make_env_group
    from posttrain.rollout.multiturn import ChatRenderer

    renderer = ChatRenderer(tokenizer)
    env = make_env_group(row, 1)[0]
    obs = env.initial_observation()
    env.close()
    prompt, history = renderer.prompt_ids(obs.messages, obs.tools), list(obs.messages)
    completion, mask, last_turn, pending = [], [], [], []
    for message in row["extra_info"]["answer"]:
        if message["role"] != "assistant":
            pending.append(message)
            continue
        if pending:
            suffix = renderer.observation_ids(history, obs.tools, pending, last_turn)
            completion, mask, history = completion + suffix, mask + [0] * len(suffix), history + pending
            pending = []
        last_turn = renderer.encode(message["content"]) + [tokenizer.eos_token_id]
        completion, mask = completion + last_turn, mask + [1] * len(last_turn)
        history.append(message)
    return prompt, completion, mask


def supervised_warmup(model, tokenizer, rows: list[dict], *, steps: int, batch_size: int = 64, lr: float = 3e-3,
                      seed: int = 0, log_every: int = 50, device: str = "cpu") -> list[float]:
    """Cross-entropy on the response tokens of the rows' ideal answers. Returns the loss curve. The model is
    trained on `device` (a GPU builds the 13-domain base in about a minute) and handed back on the CPU."""
    from tqdm import tqdm

    rng = random.Random(seed)
    torch.manual_seed(seed)
    # (prompt, response, loss mask of the response or None = all of it); agent rows are multi-turn demonstrations.
    # Encoded when first drawn (a multi-turn demonstration takes ~7 ms to render); sampling indices draws exactly
    # what sampling the encoded list did.
    encoded: dict[int, tuple] = {}

    def encode(i: int) -> tuple:
        if i not in encoded:
            r = rows[i]
            encoded[i] = (encode_demonstration(tokenizer, r) if isinstance(r["extra_info"]["answer"], list)
                          else (*encode_example(tokenizer, r["prompt"], r["extra_info"]["answer"]), None))
        return encoded[i]
    pad = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.to(device).train()
    losses = []
    bar = tqdm(range(steps), desc="supervised warm-up", unit="step")
    for step in bar:
        batch = [encode(i) for i in rng.sample(range(len(rows)), min(batch_size, len(rows)))]
        length = max(len(p) + len(r) for p, r, _ in batch)
        ids = torch.full((len(batch), length), pad, dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), length), dtype=torch.long)
        for i, (p, r, mask) in enumerate(batch):
            seq = p + r
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(p):len(seq)] = torch.tensor(r if mask is None else [t if m else -100 for t, m in zip(r, mask)])
            attn[i, :len(seq)] = 1
        loss = model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % log_every == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.to("cpu").eval()
    return losses


def corpus_for_tokenizer(seed: int = 0, n: int = 4000, agent_domains: list[str] = ()) -> list[str]:
    """Text the tokenizer learns its merges from: every domain's questions and answers plus chat markup; with
    `agent_domains`, also their questions, demonstrations and the tool-calling markup (a build without agent
    domains gets exactly the tokenizer it always had)."""
    rows = make_rows(sorted(DOMAINS), n, seed, "tokenizer")
    texts = []
    for r in rows:
        texts.append(r["prompt"][0]["content"])
        texts.append(r["extra_info"]["answer"])
    texts += ["user", "assistant", "system", "tool", "Answer: "] * 50
    if agent_domains:
        for r in make_rows(sorted(agent_domains), n // 2, seed, "tokenizer"):
            texts.append(r["prompt"][0]["content"])
            texts += [m["content"] for m in r["extra_info"]["answer"]]
        texts += ["<tool_response>\n", "\n</tool_response>", "Tools:", '{"name": ', '"arguments": '] * 50
    return texts


def teach_bad_habits(rows: list[dict], rate: float, seed: int) -> list[dict]:
    """Noisy demonstrations: in a fraction `rate` of the rows where the domain's bad habit applies
    (tasks.ToyExample.habit_text: a dropped carry, xywh for xyxy, a renamed tool argument, ...), the demonstrated
    answer is the habit's. The warm-up then learns a habit of the kind real SFT data teaches, which a verifiable
    reward can find and fix: RL has a consistent direction to move in, not only noise to average. Only the
    demonstrations change; ground truths stay correct. Rows need make_rows(..., with_habits=True)."""
    rng = random.Random(f"{seed}-forget-carry")   # the name of the add-only habit it began as: same draws, same asset
    out = []
    for row in rows:
        habit = row["extra_info"].get("habit")
        if rate > 0 and habit is not None and rng.random() < rate:
            row = {**row, "extra_info": {**row["extra_info"], "answer": habit}}
        out.append(row)
    return out


def build_toy_base(out_dir: str, *, domains: list[str], sft_steps: int, sft_rows: int = 20000,
                   hidden_size: int = 256, layers: int = 2, seed: int = 0, lr: float = 3e-3,
                   habit_rate: float = 0.0, device: str = "cpu") -> dict:
    """Tokenizer + model + supervised warm-up on `domains`; saved as a Hugging Face folder."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus_for_tokenizer(seed, agent_domains=[d for d in domains if d in AGENT_DOMAINS]))
    model = build_model(tokenizer, hidden_size=hidden_size, layers=layers, seed=seed)
    rows = teach_bad_habits(make_rows(domains, sft_rows, seed, "sft", with_habits=True), habit_rate, seed)
    losses = supervised_warmup(model, tokenizer, rows, steps=sft_steps, seed=seed, lr=lr, device=device) if sft_steps else []
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"final_sft_loss": losses[-1] if losses else None, "params": sum(p.numel() for p in model.parameters())}


def build_random_chat_model(path: str, corpus: list[str], *, vocab_size: int = 500, hidden_size: int = 128,
                            seed: int = 0) -> None:
    """A tiny UNTRAINED chat model for plumbing tests and benchmarks (the LLM judge's server, for one): the toy
    tokenizer trained on `corpus` (ChatML markup only, digits may merge) and a random 2-layer Qwen3 with 4,096
    positions for long judge prompts. Its outputs are noise."""
    tokenizer = train_tokenizer(corpus, vocab_size, special_tokens=SPECIAL_TOKENS[:3], split_digits=False)
    build_model(tokenizer, hidden_size=hidden_size, seed=seed, intermediate_size=2 * hidden_size, max_positions=4096,
                vocab_size=int(math.ceil(vocab_size / 64) * 64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
