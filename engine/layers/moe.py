"""A sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks ``top_k`` experts per token,
the experts run as one fused computation (``flotilla.kernels.moe``), and Qwen2-MoE adds a gated shared expert.

Tensor parallelism as vLLM does it for MoE: every rank holds every expert, each its slice of the experts'
intermediate size (gate/up rows, down columns), and one all-reduce sums the ranks' partial outputs. The router is
replicated, so every rank routes every token the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from flotilla.engine.layers.linear import ReplicatedLinear, with_loader
from flotilla.engine.parallel import all_reduce, split_evenly, tp
from flotilla.kernels.moe import fused_moe, select_experts


@dataclass(frozen=True)
class MoeSpec:
    """What a family's config says about one sparse layer."""

    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    renormalize: bool  # top-k weights rescaled to sum to one
    round_weights: bool  # routing weights cast to the activations' dtype (Qwen) or kept fp32 (Mixtral)
    shared_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)


class FusedExperts(nn.Module):
    """Every expert's weights, stacked: ``w13`` ``[E, 2I_r, H]`` (gate rows, then up rows) and ``w2`` ``[E, H, I_r]``,
    ``I_r`` this rank's slice. Checkpoints store one tensor per expert and projection; the loader's shard is
    ``"<expert>.gate"``, ``"<expert>.up"`` or ``"<expert>.down"``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.inter = split_evenly(intermediate_size, "the experts' intermediate size")
        self.w13 = with_loader(nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden_size)), self._load,
                               {f"{e}.{p}" for e in range(num_experts) for p in ("gate", "up")})
        self.w2 = with_loader(nn.Parameter(torch.empty(num_experts, hidden_size, self.inter)), self._load,
                              {f"{e}.down" for e in range(num_experts)})

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard: str | None) -> None:
        expert, _, part = (shard or "").partition(".")
        if not expert.isdigit() or int(expert) >= self.num_experts or part not in ("gate", "up", "down"):
            raise ValueError(f"no expert weight {shard!r} ({self.num_experts} experts)")
        e, rows, start = int(expert), self.inter, tp().rank * self.inter
        if part == "down":  # [H, I]: this rank's columns
            expected = (param.shape[1], rows * tp().size)
            piece, dst = loaded[:, start:start + rows], param.data[e]
        else:  # [I, H]: this rank's rows, into the gate or the up half
            expected = (rows * tp().size, param.shape[2])
            piece = loaded[start:start + rows]
            dst = param.data[e, :rows] if part == "gate" else param.data[e, rows:]
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expert {e} {part}: shape {tuple(loaded.shape)}, expected {expected}")
        dst.copy_(piece)


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, spec: MoeSpec, act_and_mul: Callable[[torch.Tensor], torch.Tensor],
                 shared_expert: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.act_and_mul = act_and_mul
        self.gate = ReplicatedLinear(hidden_size, spec.num_experts)
        self.experts = FusedExperts(spec.num_experts, hidden_size, spec.intermediate_size)
        self.shared_expert = shared_expert
        self.shared_expert_gate = ReplicatedLinear(hidden_size, 1) if shared_expert is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        weights, ids = select_experts(self.gate(x), s.top_k, s.renormalize, x.dtype if s.round_weights else None)
        out = all_reduce(fused_moe(x, self.experts.w13, self.experts.w2, weights, ids, self.act_and_mul))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
