"""AdamW with its two moments in host memory, streamed through the GPU bucket by bucket (`trainer.optimizer_offload`).

Why: fp32 master weights, fp32 gradients and AdamW's two fp32 moments are 16 bytes per parameter. An 8B model's
moments alone are 61 GiB: with them on the GPU the state is 122 GiB and no 80 GB GPU holds it. Moving only the
moments to (pinned) host memory halves the GPU state to 8 B/param (61 GiB at 8B) while the weights, the
gradients, the forward/backward and the update itself stay on the GPU. This differs from FSDP's CPUOffloadPolicy
(`trainer.cpu_offload`), which moves weights and gradients too and runs AdamW on the CPU: 16 B/param of host
memory (more than many GPU hosts have for an 8B model) and a CPU-speed optimizer.

A step, per bucket of at most `bucket_numel` elements of one parameter's local shard:

    copy m, v host → GPU   (stream h2d)      m ← β1·m + (1 − β1)·g                 (lerp)
    AdamW update           (compute stream)  v ← β2·v + (1 − β2)·g²
    copy m, v GPU → host   (stream d2h)      θ ← θ·(1 − lr·λ) − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

with two GPU buffers in turn, so bucket i+1's copy in and bucket i−1's copy out overlap bucket i's math. The
PCIe traffic is 16 B/param per step (m and v, both ways).

The state is torch.optim.AdamW's, key for key ("step", "exp_avg", "exp_avg_sq"; decoupled weight decay; bias
correction as its single-tensor code path computes it), so a checkpoint moves between the two optimizers and
CPU tests compare the update with torch's bit for bit. Moments of sharded (DTensor) parameters are DTensors with
host-resident local shards, so torch.distributed.checkpoint saves and reshards them like any other state.
Parameters already on the CPU (CPU training, tests) are updated in place with the same math, no copies.
"""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

DEFAULT_BUCKET_NUMEL = 1 << 26          # 64 M elements: 256 MiB per fp32 moment buffer, 1 GiB of GPU workspace


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                  step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step on flat fp32 tensors of one device, in place (torch.optim.AdamW's single-tensor math)."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class OffloadedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW whose exp_avg / exp_avg_sq live in host memory (pinned when the parameters are on a GPU)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL):
        # torch.optim.AdamW's group keys (amsgrad, maximize, foreach, ...) at their defaults, so that a checkpoint of
        # either optimizer carries every key the other one's template asks for.
        defaults = dict(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults)
        defaults.update(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.bucket_numel = bucket_numel
        self._on_gpu = any(p.is_cuda for group in self.param_groups for p in group["params"])
        for group in self.param_groups:            # eager state: host memory is known up front, and
            for p in group["params"]:              # torch.distributed.checkpoint needs state before a first step
                self.state[p] = {"step": torch.tensor(0.0), "exp_avg": self._host_zeros_like(p),
                                 "exp_avg_sq": self._host_zeros_like(p)}
        if self._on_gpu:
            self._h2d, self._d2h = torch.cuda.Stream(), torch.cuda.Stream()
            largest = max(_local(p).numel() for group in self.param_groups for p in group["params"])
            size = min(largest, bucket_numel)
            device = next(p for group in self.param_groups for p in group["params"]).device
            # two slots × (m, v): bucket i+1 loads while bucket i updates
            self._slots = [(torch.empty(size, device=device), torch.empty(size, device=device)) for _ in range(2)]

    def _host_zeros_like(self, p: torch.Tensor) -> torch.Tensor:
        local = _local(p)
        if p.dtype != torch.float32:
            raise TypeError(f"OffloadedAdamW updates fp32 master weights; got a {p.dtype} parameter")
        host = torch.zeros(local.shape, dtype=torch.float32, pin_memory=local.is_cuda)
        if isinstance(p, DTensor):
            # The parameter's own sharding spec around a host-resident shard, built as FSDP2's CPU offload builds
            # its parameters (DTensor.from_local would move the shard to the mesh's device: the GPU).
            return DTensor(host, p._spec, requires_grad=False)
        return host

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = []                                   # (param, grad, m, v) flat views, hyper-parameters
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("OffloadedAdamW implements plain AdamW: amsgrad and maximize must stay False")
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                hyper = {"step": int(state["step"].item()), "lr": float(group["lr"]), "beta1": beta1, "beta2": beta2,
                         "eps": group["eps"], "weight_decay": group["weight_decay"]}
                flat = [_local(t).view(-1) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                for start in range(0, flat[0].numel(), self.bucket_numel):
                    buckets.append(([t[start:start + self.bucket_numel] for t in flat], hyper))
        if self._on_gpu:
            self._streamed(buckets)
        else:
            for (param, grad, m, v), hyper in buckets:
                adamw_update_(param, grad, m, v, **hyper)
        return loss

    def _streamed(self, buckets) -> None:
        compute = torch.cuda.current_stream()
        slot_free: list[torch.cuda.Event | None] = [None, None]
        self._h2d.wait_stream(compute)                 # the gradients (and last step's copies) are ready
        for i, ((param, grad, m_host, v_host), hyper) in enumerate(buckets):
            m_gpu, v_gpu = (buf[:m_host.numel()] for buf in self._slots[i % 2])
            with torch.cuda.stream(self._h2d):
                if slot_free[i % 2] is not None:       # this slot's previous bucket has been copied out
                    self._h2d.wait_event(slot_free[i % 2])
                m_gpu.copy_(m_host, non_blocking=True)
                v_gpu.copy_(v_host, non_blocking=True)
            compute.wait_stream(self._h2d)
            adamw_update_(param, grad, m_gpu, v_gpu, **hyper)
            self._d2h.wait_stream(compute)
            with torch.cuda.stream(self._d2h):
                m_host.copy_(m_gpu, non_blocking=True)
                v_host.copy_(v_gpu, non_blocking=True)
                slot_free[i % 2] = torch.cuda.Event()
                slot_free[i % 2].record(self._d2h)
        # The next step's loads (h2d, ordered after compute) and any host reader wait for the last copies out.
        compute.wait_stream(self._d2h)

    def state_dict(self):
        if self._on_gpu:
            self._d2h.synchronize()                    # host moments complete before anyone reads them
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        """Copy a torch.optim.AdamW-format state into the host buffers (Optimizer.load_state_dict would move the
        moments onto the parameters' GPU, all at once)."""
        if self._on_gpu:
            self._d2h.synchronize()
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the optimizer state does not match these parameters (group sizes differ); was it "
                             "saved for another model?")
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            for p, key in zip(group["params"], saved["params"]):
                saved_state = state_dict["state"].get(key)
                if saved_state is None:
                    continue
                state = self.state[p]
                state["step"].fill_(float(saved_state["step"]))
                for name in ("exp_avg", "exp_avg_sq"):
                    _local(state[name]).copy_(_local(saved_state[name]))
