"""MOPD: multi-teacher on-policy distillation, the pure math (docs/algorithms.md §2).

What it is. The student samples y ~ πθ; the routed teacher π_T scores the same token ids and returns its
top-k. At each response position the candidates are the student's top-k ids (from π_old, the student at
the start of the update); Ω is the subset the teacher also ranks in its top-k. Each candidate in Ω gets

    π̄(v) = π_old(v) / Σ_{u∈Ω} π_old(u)            (detached; renormalised over Ω)
    δ(v) = log π_T(v) − log π_old(v)              (NOT renormalised: renormalising both sides makes k = 1
                                                   identically zero)
    a(v) = π̄(v) · δ(v)

and the loss keeps ONE TERM PER CANDIDATE:

    L = −(1/N) Σ_i (1/|M_i|) Σ_{t∈M_i} w_i,t Σ_{v∈Ω} a_t(v) · ρ_t(v),   ρ = exp(log πθ(v) − log π_old(v))

At θ = θ_old its gradient is the generalised KL on Ω divided by the detached student mass on Ω, so its only
stationary point is πθ = π_T on Ω (tests/algorithms/test_mopd_math.py checks this identity).

How it differs from the Keye-VL-2.0 report. The report writes a state-only advantage Â_t = Σ_v a_t(v)
multiplied by ∇log πθ(y_t) of the sampled token; since E_{y~π}[∇log π(y)] = 0 that gradient has zero mean
and the student learns nothing from the teacher. That literal form is kept only as the labelled ablation
`keye_literal_loss`, documented as zero-gradient. Readings we chose where the report is silent:
  - b (undefined in the report) is the train/inference gate of GSPO's §1, IcePop-style bounds on
    π_old(y_t)/μ(y_t) of the sampled token (`train_inference_gate`); off by default.
  - c, the token-category weights, are normalised to mean 1 over the batch's masked tokens
    (`normalise_token_weights`); the report gives no values; all 1 by default.
  - Empty Ω: no distillation term (the report's choice); optional MiMo-style fallback on the sampled token
    with advantage sg[log π_T(y_t) − log π_old(y_t)].
  - Localised repetition penalty: for t ≥ τ_i (where the response starts looping) the distillation term is
    replaced by +λ_rep · b · log πθ(y_t) in the loss. Off by default (λ_rep = 0).
  - Optional RL mix: + α · (GSPO-token loss with the outcome advantage A_i); α = 0 by default.

The loss as code. Each term is a pure per-token function (`distillation_term`, `empty_overlap_fallback_term`,
`repetition_term`, and for the RL mix gspo.gspo_token_loss itself); `mopd_objective` weights them, decides
where each applies and averages with gspo.sequence_mean; `mopd_metrics` computes the diagnostics beside it.
The trainer passes two objects: `MOPDLossSettings` (frozen, from the recipe) and `MOPDBatch` (the step's
tensors). `mopd_loss` keeps the pre-split flat signature on top of them.

Shapes: N sequences, T padded response length, k student top-k width, k_T teacher top-k width.
Everything is pure torch, no I/O. Metric keys carry the `mopd/` namespace of metrics.jsonl.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from posttrain.algorithms.gspo import clipped_ratio_objective, gspo_token_log_ratio, gspo_token_loss, sequence_mean

# ---------------------------------------------------------------------------------------------------------
# Advantages over the top-k overlap
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_logprobs_at_candidates(student_topk_ids: torch.Tensor, teacher_topk_ids: torch.Tensor,
                                   teacher_topk_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which student candidates the teacher also ranks, and the teacher's log-prob there.

    student_topk_ids [N,T,k]; teacher_topk_ids, teacher_topk_logprobs [N,T,k_T] (k_T may differ from k).
    Returns cand_mask [N,T,k] bool (v ∈ Ω = S_θ ∩ S_T) and cand_teacher_logprobs [N,T,k]
    (log π_T(v) for v ∈ Ω, 0 elsewhere).
    """
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
                         f"{tuple(teacher_topk_logprobs.shape)} must have the same shape")
    if student_topk_ids.shape[:-1] != teacher_topk_ids.shape[:-1]:
        raise ValueError(f"student top-k {tuple(student_topk_ids.shape)} and teacher top-k "
                         f"{tuple(teacher_topk_ids.shape)} must share the [N,T] positions; the teacher scores "
                         "must be aligned token for token with the student's response")
    # same[N,T,k,k_T] = (student id j == teacher id l): k·k_T = 256 bytes per token at k = 16, the only
    # 4-D temporary (a float one would be 4× that on a batch of millions of tokens).
    same = student_topk_ids.unsqueeze(-1) == teacher_topk_ids.unsqueeze(-2)
    cand_mask = same.any(-1)                                                                # [N,T,k]
    teacher_slot = same.to(torch.uint8).argmax(-1)                                          # [N,T,k] l of the match
    teacher_lp = teacher_topk_logprobs.gather(-1, teacher_slot)                             # [N,T,k]
    cand_teacher_logprobs = torch.where(cand_mask, teacher_lp, torch.zeros_like(teacher_lp))
    return cand_mask, cand_teacher_logprobs


@torch.no_grad()
def candidate_advantages(cand_mask: torch.Tensor, cand_old_logprobs: torch.Tensor,
                         cand_teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """a_t(v) = π̄(v) · δ(v) on Ω, 0 elsewhere.   All [N,T,k].

        π̄(v) = π_old(v) / Σ_{u∈Ω} π_old(u)     (softmax of log π_old restricted to Ω: stable in log space)
        δ(v) = log π_T(v) − log π_old(v)
    """
    neg_inf = torch.full_like(cand_old_logprobs, -math.inf)
    old_on_omega = torch.where(cand_mask, cand_old_logprobs, neg_inf)
    log_mass_on_omega = torch.logsumexp(old_on_omega, dim=-1, keepdim=True)               # [N,T,1]; −inf if Ω = ∅
    student_share = torch.exp(old_on_omega - log_mass_on_omega)                           # π̄ [N,T,k]
    delta = cand_teacher_logprobs - cand_old_logprobs                                      # δ [N,T,k]
    cand_adv = student_share * delta
    # Empty Ω gives −inf − (−inf) = NaN above; outside Ω the advantage is 0 by definition.
    return torch.where(cand_mask, cand_adv, torch.zeros_like(cand_adv))


@torch.no_grad()
def overlap_advantages(student_topk_ids: torch.Tensor, student_topk_logprobs: torch.Tensor,
                       teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-candidate MOPD advantages over the top-k overlap (docs/algorithms.md §2.3).

    student_topk_ids, student_topk_logprobs: [N,T,k], the student's top-k under π_old (the candidates, in
    the given order); teacher_topk_ids, teacher_topk_logprobs: [N,T,k_T], the routed teacher's top-k.
    Returns cand_mask [N,T,k] bool (v ∈ Ω) and cand_adv [N,T,k] = π̄(v)·(log π_T(v) − log π_old(v)) on Ω,
    0 elsewhere. Detached.
    """
    if student_topk_ids.shape != student_topk_logprobs.shape:
        raise ValueError(f"student_topk_ids {tuple(student_topk_ids.shape)} and student_topk_logprobs "
                         f"{tuple(student_topk_logprobs.shape)} must have the same shape")
    cand_mask, cand_teacher_logprobs = teacher_logprobs_at_candidates(
        student_topk_ids, teacher_topk_ids, teacher_topk_logprobs)
    cand_adv = candidate_advantages(cand_mask, student_topk_logprobs.detach(), cand_teacher_logprobs)
    return cand_mask, cand_adv


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x ≤ 0, stable at both ends (Mächler 2012): log(−expm1(x)) near 0, log1p(−eˣ) below −ln 2."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


REST_FLOOR = 1e-6   # the least mass either side may keep outside Ω (float32 cannot resolve 1 − Σ_Ω much below)


def log_mass_on_omega(cand_logprobs: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
    """log Σ_{v∈Ω} π(v).   [N,T,k] → [N,T]; −inf where Ω is empty."""
    on_omega = torch.where(cand_mask.bool(), cand_logprobs, torch.full_like(cand_logprobs, -math.inf))
    return torch.logsumexp(on_omega, dim=-1)


def log_mass_outside(cand_logprobs: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
    """log π(R), R = V ∖ Ω: log(1 − Σ_{v∈Ω} π(v)), floored at log REST_FLOOR.   [N,T,k] → [N,T]

    Differentiable in cand_logprobs (full-vocabulary log-probs at the candidates); an empty Ω gives log 1 = 0."""
    # Clamp the input, not the output: at Σ_Ω π = 1 the derivative of log(1 − eˣ) is infinite, and inf·0 = NaN.
    return log1mexp(log_mass_on_omega(cand_logprobs, cand_mask).clamp(max=math.log1p(-REST_FLOOR)))


@torch.no_grad()
def rest_bucket_advantage(cand_mask: torch.Tensor, cand_old_logprobs: torch.Tensor,
                          cand_teacher_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mass outside Ω as one more candidate (docs/algorithms.md §2.3, `rest_bucket`).   [N,T,k] → [N,T] ×2

        R = V ∖ Ω,   π(R) = 1 − Σ_{v∈Ω} π(v)   (student at θ_old and teacher alike, floored at REST_FLOOR)
        a(R) = π_old(R) / Σ_{u∈Ω} π_old(u) · (log π_T(R) − log π_old(R))      (the same π̄ normaliser as a(v))

    Returns (log π_old(R), a(R)); a(R) = 0 where Ω is empty (no distillation term there at all).
    """
    rest_old = log_mass_outside(cand_old_logprobs, cand_mask)                               # [N,T]
    rest_teacher = log_mass_outside(cand_teacher_logprobs, cand_mask)                       # [N,T]
    nonempty = cand_mask.any(-1)
    old_on_omega = torch.where(nonempty, log_mass_on_omega(cand_old_logprobs, cand_mask), torch.zeros_like(rest_old))
    share = torch.exp(rest_old - old_on_omega)
    rest_adv = torch.where(nonempty, share * (rest_teacher - rest_old), torch.zeros_like(rest_old))
    return rest_old, rest_adv


# ---------------------------------------------------------------------------------------------------------
# Token weights: the train/inference gate b and the category weights c
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def train_inference_gate(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, *,
                         low: float = 0.5, high: float = 2.0) -> torch.Tensor:
    """IcePop-style gate on the sampled token:  b[N,T] = 1[ low ≤ π_old(y_t) / μ(y_t) ≤ high ].

    old_logprobs: the trainer's log π_old(y_t); rollout_logprobs: the inference engine's sampling log-prob
    log μ(y_t) (same token ids). Tokens where trainer and engine disagree too much get weight 0.
    Returns float [N,T] of 0/1 in old_logprobs' dtype.
    """
    if not 0.0 < low <= 1.0 <= high:
        raise ValueError(f"gate bounds must satisfy 0 < low ≤ 1 ≤ high, got low={low}, high={high}")
    log_ratio = old_logprobs - rollout_logprobs                                            # log(π_old/μ)
    keep = (log_ratio >= math.log(low)) & (log_ratio <= math.log(high))
    return keep.to(old_logprobs.dtype)


@torch.no_grad()
def normalise_token_weights(raw_weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """c[N,T] = raw · (|M| / Σ_{masked} raw): mean 1 over the masked tokens of the batch.

    Normalising keeps the loss scale (and so the learning rate) independent of the chosen category weights;
    only their ratios matter. Values at unmasked positions are scaled too but never used.
    """
    if raw_weights.shape != mask.shape:
        raise ValueError(f"raw_weights {tuple(raw_weights.shape)} and mask {tuple(mask.shape)} must both be [N,T]")
    if bool((raw_weights < 0).any()):
        raise ValueError("token category weights must be ≥ 0")
    mask_f = mask.to(raw_weights.dtype)
    num_tokens = mask_f.sum()
    total = (raw_weights * mask_f).sum()
    if num_tokens == 0:
        return torch.ones_like(raw_weights)
    if total <= 0:
        raise ValueError("every masked token has category weight 0, so nothing would be trained; give at least "
                         "one category present in the batch a positive weight")
    return raw_weights * (num_tokens / total)


# ---------------------------------------------------------------------------------------------------------
# What the trainer passes: the loss settings and the batch's tensors
# ---------------------------------------------------------------------------------------------------------

LOSS_FORMS = ("per_candidate", "keye_literal")


@dataclass(frozen=True)
class MOPDLossSettings:
    """The settings of the MOPD loss (recipe keys mopd.* and gspo.clip_low / clip_high). Frozen and picklable:
    it travels to the trainer ranks. Defaults are pure MOPD with every option off.

    loss_form               "per_candidate" (the objective) or "keye_literal" (the report's formula taken
                            literally: an ablation with zero expected gradient, docs/algorithms.md §2.2)
    clip_eps                per-candidate PPO clip ε of the distillation and fallback ratios (None: no clip)
    empty_overlap_fallback  where Ω is empty, train the sampled token with the reverse-KL advantage
    repetition_penalty      λ_rep ≥ 0 after the loop point τ_i (0: off)
    rl_alpha                α ≥ 0, the weight of the GSPO outcome-advantage term (0: pure MOPD)
    rl_clip_low, rl_clip_high   GSPO's ε_low, ε_high for that term
    rest_bucket             add the mass outside Ω as one more candidate (`rest_bucket_term`): the gradient is
                            then a true KL's, and pushing Ω down cannot leak mass onto tokens the teacher rejects
    """
    loss_form: str = "per_candidate"
    clip_eps: float | None = None
    empty_overlap_fallback: bool = False
    rest_bucket: bool = False
    repetition_penalty: float = 0.0
    rl_alpha: float = 0.0
    rl_clip_low: float = 3e-4
    rl_clip_high: float = 4e-4

    def __post_init__(self):
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}")
        if self.clip_eps is not None and not self.clip_eps > 0:
            raise ValueError(f"clip_eps must be > 0 (or None for no clip), got {self.clip_eps}")
        if self.repetition_penalty < 0:
            raise ValueError(f"repetition_penalty must be ≥ 0 (it pushes looping tokens down), "
                             f"got {self.repetition_penalty}")
        if self.rl_alpha < 0:
            raise ValueError(f"rl_alpha must be ≥ 0, got {self.rl_alpha}")
        if self.rl_clip_low < 0 or self.rl_clip_high < 0:
            raise ValueError(f"rl_clip_low and rl_clip_high must be ≥ 0, got {self.rl_clip_low}, {self.rl_clip_high}")

    @property
    def needs_sampled_logprobs(self) -> bool:
        """Whether the loss reads log πθ(y_t) of the sampled tokens (the trainer computes it only then)."""
        return (self.loss_form == "keye_literal" or self.empty_overlap_fallback or self.repetition_penalty > 0
                or self.rl_alpha > 0)


_LONG_FIELDS = ("cand_ids", "loop_start", "teacher_index")
_BOOL_FIELDS = ("cand_mask",)


@dataclass(frozen=True, eq=False)
class MOPDBatch:
    """The per-batch tensors of the MOPD loss. All detached: the driver computes them once per step at θ_old.

    Required:
      mask [N,T]                     1 on policy-generated response tokens
      cand_old_logprobs [N,T,k]      log π_old(v) at the candidates (the student's top-k under π_old)
      cand_adv, cand_mask [N,T,k]    a_t(v) and v ∈ Ω, from `overlap_advantages`
    Optional (None: off, or 1 for weights):
      cand_ids [N,T,k] long          the candidates' token ids, where the trainer evaluates log πθ (the loss
                                     itself does not read them)
      token_weights [N,T]            c, the category weights (`normalise_token_weights`)
      gate [N,T]                     b, the train/inference gate (`train_inference_gate`)
      sampled_old_logprobs [N,T]     log π_old(y_t): fallback and RL terms, reverse-KL metric
      sampled_teacher_logprobs [N,T] log π_T(y_t): fallback term, reverse-KL metric
      loop_start [N] long            τ_i (token_categories.loop_starts); τ_i ≥ T or τ_i < 0: no loop
      outcome_advantages [N]         A_i (gspo.group_advantages): RL mix
      cand_teacher_logprobs [N,T,k]  log π_T at the candidates: teacher-mass-on-Ω metric only
      teacher_index [N] long         the teacher each sequence was routed to: per-teacher metrics only
      rest_old_logprobs, rest_adv [N,T]   log π_old(R) and a(R) of the rest bucket (`rest_bucket_advantage`)
      rollout_logprobs [N,T]         μ(y_t), the engine's sampling log-prob: the train/inference mismatch metric
    """
    mask: torch.Tensor
    cand_old_logprobs: torch.Tensor
    cand_adv: torch.Tensor
    cand_mask: torch.Tensor
    cand_ids: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    sampled_old_logprobs: torch.Tensor | None = None
    sampled_teacher_logprobs: torch.Tensor | None = None
    loop_start: torch.Tensor | None = None
    outcome_advantages: torch.Tensor | None = None
    cand_teacher_logprobs: torch.Tensor | None = None
    teacher_index: torch.Tensor | None = None
    rest_old_logprobs: torch.Tensor | None = None
    rest_adv: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None

    def __post_init__(self):
        cand_shape = tuple(self.cand_adv.shape)
        if len(cand_shape) != 3:
            raise ValueError(f"cand_adv must be [N,T,k], got {cand_shape}")
        num_seqs, num_tokens, _ = cand_shape
        expected = {"mask": (num_seqs, num_tokens), "cand_old_logprobs": cand_shape, "cand_mask": cand_shape,
                    "cand_ids": cand_shape, "cand_teacher_logprobs": cand_shape,
                    "token_weights": (num_seqs, num_tokens), "gate": (num_seqs, num_tokens),
                    "sampled_old_logprobs": (num_seqs, num_tokens), "sampled_teacher_logprobs": (num_seqs, num_tokens),
                    "loop_start": (num_seqs,), "outcome_advantages": (num_seqs,), "teacher_index": (num_seqs,),
                    "rest_old_logprobs": (num_seqs, num_tokens), "rest_adv": (num_seqs, num_tokens),
                    "rollout_logprobs": (num_seqs, num_tokens)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                layout = {2: "[N,T]", 1: "[N]", 3: "[N,T,k]"}[len(shape)]
                raise ValueError(f"MOPD batch: {name} must be {layout} = {shape} (from cand_adv {cand_shape}), "
                                 f"got {tuple(value.shape)}")

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, object], *, device: torch.device | str | None = None,
                    float_dtype: torch.dtype = torch.float32) -> "MOPDBatch":
        """From the driver's arrays (numpy or tensors, keyed by field name): ids and τ as long, cand_mask as bool,
        the rest as float_dtype. An unknown key is an error (a misspelt key must not silently mean "off")."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(arrays) - fields)
        if unknown:
            raise ValueError(f"MOPD batch: unknown array(s) {unknown}; the known names are {sorted(fields)}")

        def dtype_of(name: str) -> torch.dtype:
            return torch.long if name in _LONG_FIELDS else torch.bool if name in _BOOL_FIELDS else float_dtype
        return cls(**{name: torch.as_tensor(value, dtype=dtype_of(name), device=device)
                      for name, value in arrays.items() if value is not None})


# ---------------------------------------------------------------------------------------------------------
# The loss as per-token terms (each pure; the composition decides where each applies and how it is weighted)
# ---------------------------------------------------------------------------------------------------------


def distillation_term(cand_logprobs: torch.Tensor, cand_old_logprobs: torch.Tensor, cand_adv: torch.Tensor,
                      cand_mask: torch.Tensor, *, clip_eps: float | None = None) -> torch.Tensor:
    """One term per candidate in Ω (docs/algorithms.md §2.3).   cand_* [N,T,k] → [N,T]

        ℓ_distill[i,t] = −Σ_{v∈Ω} a_t(v)·ρ_t(v),        ρ_t(v) = exp(log πθ(v) − log π_old(v))
        (clip_eps = ε: −Σ_{v∈Ω} min(a·ρ, a·clip(ρ, 1−ε, 1+ε)), PPO per candidate)

    cand_logprobs is differentiable (topk/logprobs.chunked_logprobs_at); the rest are detached.
    """
    cand_old = cand_old_logprobs.detach().to(cand_logprobs.dtype)
    cand_adv = cand_adv.detach().to(cand_logprobs.dtype)
    cand_mask = cand_mask.bool()
    zeros = torch.zeros_like(cand_old)
    # Outside Ω the log-ratio is zeroed before exp so that no inf/NaN can leak into the gradient.
    cand_log_ratio = torch.where(cand_mask, cand_logprobs - cand_old, zeros)                # [N,T,k]
    cand_obj, _ = clipped_ratio_objective(cand_log_ratio, cand_adv, clip_eps, clip_eps)      # a·ρ [N,T,k]
    return -torch.where(cand_mask, cand_obj, torch.zeros_like(cand_obj)).sum(-1)


def rest_bucket_term(cand_logprobs: torch.Tensor, cand_mask: torch.Tensor, rest_old_logprobs: torch.Tensor,
                     rest_adv: torch.Tensor, *, clip_eps: float | None = None) -> torch.Tensor:
    """The rest bucket R = V ∖ Ω as one more candidate.   cand_* [N,T,k], rest_* [N,T] → [N,T]

        ℓ_rest[i,t] = −a_t(R)·ρ_t(R),     ρ_t(R) = exp(log πθ(R) − log π_old(R)),  log πθ(R) = log(1 − Σ_Ω πθ(v))
        (clip_eps = ε: PPO per candidate, as distillation_term)

    Why: the Ω terms alone follow the generalised KL on Ω (§2.3), which moves Ω's total mass freely; where the
    student is more confident than the teacher on Ω every a(v) < 0 and the mass leaves Ω — for tokens outside
    BOTH top-k lists, i.e. ones the teacher rejects. With R, at θ = θ_old the summed gradient is that of the true
    KL between the coarsened distributions (Ω's tokens and R) over sg[π_old(Ω)], whose minimum also matches
    the mass outside Ω. a(R) = 0 where Ω is empty, so the term vanishes there.
    """
    rest_theta = log_mass_outside(cand_logprobs, cand_mask)                                  # log πθ(R) [N,T]
    log_ratio = rest_theta - rest_old_logprobs.detach().to(cand_logprobs.dtype)
    objective, _ = clipped_ratio_objective(log_ratio, rest_adv.detach().to(cand_logprobs.dtype), clip_eps, clip_eps)
    return -objective


def empty_overlap_fallback_term(sampled_logprobs: torch.Tensor, sampled_old_logprobs: torch.Tensor,
                                sampled_teacher_logprobs: torch.Tensor, at: torch.Tensor, *,
                                clip_eps: float | None = None) -> torch.Tensor:
    """MiMo-style fallback on the sampled token where Ω is empty (docs/algorithms.md §2.7).   [N,T] → [N,T]

        ℓ_fb[i,t] = −1[at]·A_y·ρ_y,   A_y = sg[log π_T(y_t) − log π_old(y_t)],
                                       ρ_y = exp(log πθ(y_t) − log π_old(y_t))
        (clip_eps = ε: −1[at]·min(A_y·ρ_y, A_y·clip(ρ_y, 1−ε, 1+ε)))

    at [N,T] bool: where the fallback applies; elsewhere the term is exactly 0 with zero gradient.
    """
    dtype = sampled_logprobs.dtype
    old_y = sampled_old_logprobs.detach().to(dtype)
    teacher_y = sampled_teacher_logprobs.detach().to(dtype)
    zeros = torch.zeros_like(old_y)
    advantage = torch.where(at, teacher_y - old_y, zeros)                                    # A_y [N,T]
    log_ratio = torch.where(at, sampled_logprobs - old_y, zeros)
    objective, _ = clipped_ratio_objective(log_ratio, advantage, clip_eps, clip_eps)
    return -torch.where(at, objective, torch.zeros_like(objective))


def repetition_term(sampled_logprobs: torch.Tensor, past_loop: torch.Tensor) -> torch.Tensor:
    """Localised repetition penalty (docs/algorithms.md §2.5).   [N,T] → [N,T]

        ℓ_rep[i,t] = 1[t ≥ τ_i] · log πθ(y_t)

    Minimising it lowers the probability of the looping tokens; before τ_i it is 0 (normal length is never
    penalised).
    """
    return torch.where(past_loop, sampled_logprobs, torch.zeros_like(sampled_logprobs))


def keye_literal_term(sampled_logprobs: torch.Tensor, weighted_state_advantage: torch.Tensor) -> torch.Tensor:
    """ABLATION ONLY: the report's formula taken literally, ZERO EXPECTED GRADIENT (docs/algorithms.md §2.2).

        ℓ_lit[i,t] = −(b·c·Â_i,t) · log πθ(y_i,t),     Â_i,t = Σ_{v∈Ω} a_t(v)   (state-only, detached)

    sampled_logprobs [N,T] differentiable; weighted_state_advantage [N,T] = b·c·Â (the report's b·Â) → [N,T].
    """
    return -weighted_state_advantage.detach() * sampled_logprobs


def past_loop_mask(loop_start: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """1[t ≥ τ_i] for τ_i ≥ 0; τ_i < 0, τ_i ≥ T or loop_start None: no loop.   loop_start [N], mask [N,T] → bool [N,T]"""
    if loop_start is None:
        return torch.zeros_like(mask, dtype=torch.bool)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    starts = loop_start.to(positions.device).long()
    return (positions.unsqueeze(0) >= starts.unsqueeze(-1)) & (starts >= 0).unsqueeze(-1)


def _term_positions(batch: MOPDBatch, settings: MOPDLossSettings
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each term applies: (past_loop, distill_active, fallback_at), all bool [N,T].

    Past τ_i the repetition penalty replaces distillation (when it is on); the fallback takes the positions
    of distillation whose Ω is empty."""
    past_loop = past_loop_mask(batch.loop_start, batch.mask)
    penalise_loop = settings.repetition_penalty > 0 and batch.loop_start is not None
    distill_active = ~past_loop if penalise_loop else torch.ones_like(past_loop)
    empty_omega = ~batch.cand_mask.bool().any(-1)
    fallback_at = (empty_omega & distill_active if settings.empty_overlap_fallback
                   else torch.zeros_like(past_loop))
    return past_loop, distill_active, fallback_at


def _gate_and_weight(batch: MOPDBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """b [N,T] and w = b·c [N,T] (absent ones are 1)."""
    ones = torch.ones_like(batch.mask, dtype=dtype)
    category_weight = ones if batch.token_weights is None else batch.token_weights.detach().to(dtype)
    gate = ones if batch.gate is None else batch.gate.detach().to(dtype)
    return gate, gate * category_weight


def _require(name: str, value, reason: str):
    if value is None:
        raise ValueError(f"MOPD loss: {name} is required when {reason}")
    return value


def mopd_objective(batch: MOPDBatch, settings: MOPDLossSettings, *, cand_logprobs: torch.Tensor | None,
                   sampled_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MOPD loss (docs/algorithms.md §2.8): the per-token terms, weighted, summed, each sequence counted once.

        loss   = (1/N') Σ_i (1/|M_i|) Σ_{t∈M_i} ℓ_i,t                                        (gspo.sequence_mean)
        ℓ_i,t  = w·1[t<τ_i]·(ℓ_distill [+ ℓ_rest])  + w·ℓ_fb  + λ_rep·b·ℓ_rep  + α·b·ℓ_GSPO-token,   w = b·c
        (loss_form keye_literal: ℓ_i,t = ℓ_lit, the zero-gradient ablation)

    cand_logprobs [N,T,k]: log πθ at batch.cand_ids, differentiable (None only for keye_literal);
    sampled_logprobs [N,T]: log πθ(y_t), differentiable, required when settings.needs_sampled_logprobs.
    Returns (loss scalar, {term: weighted per-token loss [N,T]}) in the order they are summed; terms that are
    off are absent. Pass the dict to `mopd_metrics`.
    """
    if settings.loss_form == "keye_literal":
        lp_y = _require("sampled_logprobs", sampled_logprobs, "loss_form='keye_literal'")
        _, weight = _gate_and_weight(batch, lp_y.dtype)
        state_adv = batch.cand_adv.detach().to(lp_y.dtype).sum(-1)                            # Â [N,T]
        token_losses = {"keye_literal": keye_literal_term(lp_y, weight * state_adv)}
        return sequence_mean(token_losses["keye_literal"], batch.mask), token_losses

    cand_logprobs = _require("cand_logprobs", cand_logprobs, "loss_form='per_candidate'")
    if cand_logprobs.shape != batch.cand_adv.shape:
        raise ValueError(f"cand_logprobs {tuple(cand_logprobs.shape)} must match the batch's candidates "
                         f"{tuple(batch.cand_adv.shape)}")
    dtype = cand_logprobs.dtype
    gate, weight = _gate_and_weight(batch, dtype)
    past_loop, distill_active, fallback_at = _term_positions(batch, settings)

    distill = distillation_term(cand_logprobs, batch.cand_old_logprobs, batch.cand_adv, batch.cand_mask,
                                clip_eps=settings.clip_eps)
    if settings.rest_bucket:
        reason = "rest_bucket=True"
        distill = distill + rest_bucket_term(
            cand_logprobs, batch.cand_mask, _require("rest_old_logprobs", batch.rest_old_logprobs, reason),
            _require("rest_adv", batch.rest_adv, reason), clip_eps=settings.clip_eps)
    token_losses = {"distillation": weight * torch.where(distill_active, distill, torch.zeros_like(distill))}
    if settings.empty_overlap_fallback:
        reason = "empty_overlap_fallback=True"
        token_losses["empty_overlap_fallback"] = weight * empty_overlap_fallback_term(
            _require("sampled_logprobs", sampled_logprobs, reason),
            _require("sampled_old_logprobs", batch.sampled_old_logprobs, reason).to(dtype),
            _require("sampled_teacher_logprobs", batch.sampled_teacher_logprobs, reason).to(dtype),
            fallback_at, clip_eps=settings.clip_eps)
    if settings.repetition_penalty > 0 and batch.loop_start is not None:
        lp_y = _require("sampled_logprobs", sampled_logprobs, "repetition_penalty > 0")
        token_losses["repetition"] = (settings.repetition_penalty * gate) * repetition_term(lp_y, past_loop)
    if settings.rl_alpha > 0:
        reason = "rl_alpha > 0"
        # The RL mix is GSPO-token itself (gspo.py), on every response token, gated by b.
        token_losses["rl"] = (settings.rl_alpha * gate) * gspo_token_loss(
            _require("sampled_logprobs", sampled_logprobs, reason),
            _require("sampled_old_logprobs", batch.sampled_old_logprobs, reason).detach().to(dtype),
            _require("outcome_advantages", batch.outcome_advantages, reason).detach().to(dtype),
            batch.mask.to(dtype), clip_low=settings.rl_clip_low, clip_high=settings.rl_clip_high)
    return sequence_mean(_sum_terms(token_losses), batch.mask.to(dtype)), token_losses


def _sum_terms(token_losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Σ of the per-token terms, left to right in the dict's order (the order fixes the rounding)."""
    terms = iter(token_losses.values())
    total = next(terms)
    for term in terms:
        total = total + term
    return total


# ---------------------------------------------------------------------------------------------------------
# Metrics, beside the loss
# ---------------------------------------------------------------------------------------------------------


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    count = mask.sum()
    return float((values * mask).sum() / count) if count > 0 else 0.0


@torch.no_grad()
def mopd_metrics(batch: MOPDBatch, settings: MOPDLossSettings, *,
                 token_losses: Mapping[str, torch.Tensor] | None = None, cand_logprobs: torch.Tensor | None = None,
                 sampled_logprobs: torch.Tensor | None = None, teacher_names: Sequence[str] | None = None
                 ) -> dict[str, float]:
    """The `mopd/` metrics of one batch: token means over the masked response tokens.

    From the batch alone: overlap_ratio |Ω|/k, empty_overlap_frac, student_mass_on_overlap, adv_mean (the
    report's Â_t), teacher_mass_on_overlap (needs cand_teacher_logprobs), reverse_kl sg[log π_old(y) − log π_T(y)]
    (needs the sampled log-probs), gate_drop_frac, weight_mean, fallback_token_frac, loop_token_frac,
    loop_seq_frac, and per teacher (needs teacher_index; `per_teacher_metrics`).
    With token_losses (from `mopd_objective`): loss and loss_<term>. With cand_logprobs: clip_frac (else θ = θ_old,
    where nothing is clipped: 0). With sampled_logprobs and rl_alpha > 0: rl_clip_frac.
    """
    dtype = cand_logprobs.dtype if cand_logprobs is not None else batch.cand_old_logprobs.dtype
    mask_f = batch.mask.to(dtype)
    k = batch.cand_mask.shape[-1]
    cand_mask = batch.cand_mask.bool()
    cand_old = batch.cand_old_logprobs.detach().to(dtype)
    cand_adv = batch.cand_adv.detach().to(dtype)
    gate, weight = _gate_and_weight(batch, dtype)
    past_loop, _, fallback_at = _term_positions(batch, settings)

    old_probs = torch.exp(cand_old)
    per_token = {
        "overlap_ratio": cand_mask.to(dtype).sum(-1) / k,                                   # |Ω|/k
        "empty_overlap_frac": (~cand_mask.any(-1)).to(dtype),
        "student_mass_on_overlap": torch.where(cand_mask, old_probs, torch.zeros_like(old_probs)).sum(-1),
        "adv_mean": cand_adv.sum(-1),                                                        # the report's Â_t
    }
    if batch.rest_adv is not None:
        per_token["rest_adv_mean"] = batch.rest_adv.detach().to(dtype)                        # a(R)
    if batch.cand_teacher_logprobs is not None:
        teacher_probs = torch.exp(batch.cand_teacher_logprobs.detach().to(dtype))
        per_token["teacher_mass_on_overlap"] = torch.where(
            cand_mask, teacher_probs, torch.zeros_like(teacher_probs)).sum(-1)
    if batch.sampled_old_logprobs is not None and batch.sampled_teacher_logprobs is not None:
        # sg[log π_old(y_t) − log π_T(y_t)]: single-sample estimate of KL(π_old ‖ π_T); should fall.
        per_token["reverse_kl"] = (batch.sampled_old_logprobs - batch.sampled_teacher_logprobs).to(dtype)
    if batch.sampled_old_logprobs is not None and batch.rollout_logprobs is not None:
        # |log π_old(y_t) − log μ(y_t)|: the trainer and the engine should agree on the sampled tokens (≈ 0)
        per_token["train_inference_abs_diff"] = (batch.sampled_old_logprobs - batch.rollout_logprobs).abs().to(dtype)
    metrics = {f"mopd/{name}": _masked_mean(value, mask_f) for name, value in per_token.items()}

    valid = mask_f > 0
    num_valid_seqs = max(int(valid.any(-1).sum()), 1)
    metrics.update({
        "mopd/gate_drop_frac": _masked_mean((gate == 0).to(dtype), mask_f),
        "mopd/weight_mean": _masked_mean(weight, mask_f),
        "mopd/fallback_token_frac": _masked_mean(fallback_at.to(dtype), mask_f),
        "mopd/loop_token_frac": _masked_mean(past_loop.to(dtype), mask_f),
        # a sequence is "past τ" when at least one of its response tokens lies at or after τ_i
        "mopd/loop_seq_frac": float((past_loop & valid).any(-1).sum()) / num_valid_seqs,
    })

    if token_losses is not None:
        def term_mean(*names: str) -> float:
            present = {name: token_losses[name] for name in names if name in token_losses}
            return float(sequence_mean(_sum_terms(present), batch.mask.to(dtype))) if present else 0.0
        metrics["mopd/loss"] = float(sequence_mean(_sum_terms(token_losses), batch.mask.to(dtype)))
        if settings.loss_form == "keye_literal":
            metrics["mopd/loss_keye_literal"] = term_mean("keye_literal")
        else:
            metrics["mopd/loss_distill"] = term_mean("distillation", "empty_overlap_fallback")
            metrics["mopd/loss_repetition"] = term_mean("repetition")
            metrics["mopd/loss_rl"] = term_mean("rl")

    clip_frac = 0.0
    if cand_logprobs is not None and settings.loss_form == "per_candidate":
        cand_log_ratio = torch.where(cand_mask, cand_logprobs.detach() - cand_old, torch.zeros_like(cand_old))
        _, cand_clipped = clipped_ratio_objective(cand_log_ratio, cand_adv, settings.clip_eps, settings.clip_eps)
        cand_valid = cand_mask & valid.unsqueeze(-1)
        if cand_valid.any():
            clip_frac = float((cand_clipped & cand_valid).sum() / cand_valid.sum())
    metrics["mopd/clip_frac"] = clip_frac
    if (settings.rl_alpha > 0 and sampled_logprobs is not None and batch.sampled_old_logprobs is not None
            and batch.outcome_advantages is not None):
        log_token_ratio = gspo_token_log_ratio(sampled_logprobs.detach(), batch.sampled_old_logprobs.to(dtype), mask_f)
        outcome = batch.outcome_advantages.to(dtype).unsqueeze(-1).expand_as(mask_f)
        _, rl_clipped = clipped_ratio_objective(log_token_ratio, outcome, settings.rl_clip_low, settings.rl_clip_high)
        metrics["mopd/rl_clip_frac"] = _masked_mean(rl_clipped.to(dtype), mask_f)

    if batch.teacher_index is not None:
        metrics.update(per_teacher_metrics(per_token, mask_f, batch.teacher_index, teacher_names))
    return metrics


# ---------------------------------------------------------------------------------------------------------
# The pre-split entry point, kept for its callers: the same loss, gradients and metrics
# ---------------------------------------------------------------------------------------------------------


def mopd_loss(cand_logprobs: torch.Tensor, cand_old_logprobs: torch.Tensor, cand_adv: torch.Tensor,
              cand_mask: torch.Tensor, token_weights: torch.Tensor | None, mask: torch.Tensor, *,
              gate: torch.Tensor | None = None,
              clip_eps: float | None = None,
              sampled_logprobs: torch.Tensor | None = None,
              sampled_old_logprobs: torch.Tensor | None = None,
              sampled_teacher_logprobs: torch.Tensor | None = None,
              empty_overlap_fallback: bool = False,
              loop_start: torch.Tensor | None = None,
              repetition_penalty: float = 0.0,
              rl_alpha: float = 0.0,
              outcome_advantages: torch.Tensor | None = None,
              rl_clip_low: float = 3e-4,
              rl_clip_high: float = 4e-4,
              cand_teacher_logprobs: torch.Tensor | None = None,
              teacher_index: torch.Tensor | None = None,
              teacher_names: Sequence[str] | None = None,
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """`mopd_objective` + `mopd_metrics` behind the flat pre-split signature. Returns (loss, metrics).

    New code passes a `MOPDBatch` and `MOPDLossSettings` instead; the arguments here are their fields.
    outcome_advantages is read only when rl_alpha > 0 (as before the split).
    """
    settings = MOPDLossSettings(clip_eps=clip_eps, empty_overlap_fallback=empty_overlap_fallback,
                                repetition_penalty=repetition_penalty, rl_alpha=rl_alpha,
                                rl_clip_low=rl_clip_low, rl_clip_high=rl_clip_high)
    batch = MOPDBatch(mask=mask, cand_old_logprobs=cand_old_logprobs, cand_adv=cand_adv, cand_mask=cand_mask,
                      token_weights=token_weights, gate=gate, sampled_old_logprobs=sampled_old_logprobs,
                      sampled_teacher_logprobs=sampled_teacher_logprobs, loop_start=loop_start,
                      outcome_advantages=outcome_advantages if rl_alpha > 0 else None,
                      cand_teacher_logprobs=cand_teacher_logprobs, teacher_index=teacher_index)
    loss, token_losses = mopd_objective(batch, settings, cand_logprobs=cand_logprobs,
                                        sampled_logprobs=sampled_logprobs)
    return loss, mopd_metrics(batch, settings, token_losses=token_losses, cand_logprobs=cand_logprobs,
                              sampled_logprobs=sampled_logprobs, teacher_names=teacher_names)


def per_teacher_metrics(per_token: Mapping[str, torch.Tensor], mask: torch.Tensor, teacher_index: torch.Tensor,
                        teacher_names: Sequence[str] | None = None, prefix: str = "mopd/") -> dict[str, float]:
    """Token means of each per-token quantity, split by the teacher each sequence was routed to.

    per_token: name → [N,T] (e.g. "reverse_kl", "adv_mean", "overlap_ratio"); mask [N,T];
    teacher_index long [N] (position in teacher_names; ids are used as names when teacher_names is None).
    Returns {f"{prefix}{name}/{teacher}": mean over that teacher's masked tokens} plus
    {f"{prefix}token_share/{teacher}": its share of the batch's masked tokens}. Teachers with no token in
    the batch are left out (a 0 would read as a measurement).
    """
    if teacher_index.shape != mask.shape[:1]:
        raise ValueError(f"teacher_index must be [N] = ({mask.shape[0]},), got {tuple(teacher_index.shape)}")
    mask_f = mask.to(torch.float64)
    total_tokens = float(mask_f.sum())
    metrics: dict[str, float] = {}
    for index in sorted({int(i) for i in teacher_index.tolist()}):
        if teacher_names is not None:
            if not 0 <= index < len(teacher_names):
                raise ValueError(f"teacher_index {index} is outside teacher_names (length {len(teacher_names)})")
            name = teacher_names[index]
        else:
            name = str(index)
        rows = (teacher_index == index).to(mask_f.device)
        teacher_mask = mask_f * rows.unsqueeze(-1).to(mask_f.dtype)
        count = float(teacher_mask.sum())
        if count == 0:
            continue
        metrics[f"{prefix}token_share/{name}"] = count / total_tokens
        for key, values in per_token.items():
            metrics[f"{prefix}{key}/{name}"] = float((values.to(torch.float64) * teacher_mask).sum() / count)
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Ablation only
# ---------------------------------------------------------------------------------------------------------


def keye_literal_loss(sampled_logprobs: torch.Tensor, cand_adv: torch.Tensor, token_weights: torch.Tensor | None,
                      mask: torch.Tensor, *, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """ABLATION ONLY — the Keye-VL-2.0 report's formula taken literally. ZERO EXPECTED GRADIENT: do not train with it.

        Â_i,t = Σ_{v∈Ω} a_t(v)                                   (state-only, detached)
        L     = −(1/N) Σ_i (1/|M_i|) Σ_{t∈M_i} b·c·Â_i,t · log πθ(y_i,t)

    Â depends on the state, not on the sampled token, and E_{y~πθ}[∇ log πθ(y)] = 0, so the expected
    gradient is exactly zero: the student learns nothing from the teacher, only noise (docs/algorithms.md §2.2).
    Kept to reproduce that finding (`keye_literal_term`; `mopd_objective` with loss_form="keye_literal").
    sampled_logprobs [N,T] differentiable; cand_adv [N,T,k]; token_weights, mask, gate [N,T].
    """
    dtype = sampled_logprobs.dtype
    mask_f = mask.to(dtype)
    weight = torch.ones_like(mask_f) if token_weights is None else token_weights.detach().to(dtype)
    if gate is not None:
        weight = weight * gate.detach().to(dtype)
    state_adv = cand_adv.detach().to(dtype).sum(-1)                                        # Â [N,T]
    loss = sequence_mean(keye_literal_term(sampled_logprobs, weight * state_adv), mask_f)
    return loss, {"mopd_literal/loss": float(loss.detach()), "mopd_literal/adv_mean": _masked_mean(state_adv, mask_f)}
