"""Mixture-of-experts: routing, the torch reference of the experts' computation, and the one dispatch point the
MoE layer calls.

Each token goes to ``top_k`` experts; expert ``e`` computes ``down_e(act(gate_e(x)) * up_e(x))`` and the token's
output is the sum over its experts, each scaled by its routing weight. Weights are stacked per layer:
``w13`` ``[E, 2I, H]`` (each expert's gate rows, then its up rows) and ``w2`` ``[E, H, I]``.

- ``select_experts``: softmax over the router's logits (in fp32), the top-k, optionally renormalised to sum to
  one (Mixtral always; Qwen's ``norm_topk_prob``): pure.
- ``fused_moe_ref``: the oracle, in transformers' order of operations (expert by expert, ascending, each
  expert's rows gathered, its output scaled and added into the token's row), so fp32 agrees bit for bit. It is
  also the CPU path: the per-expert GEMMs are oneDNN's, and a sync to list the experts hit costs nothing there.
- The Triton kernel (``flotilla.kernels.triton_moe``) is the CUDA path: a grouped GEMM over experts, with no
  host sync, so a decode step with MoE layers can be captured in a CUDA graph.
``FLOTILLA_MOE_BACKEND=torch|triton`` overrides the choice (tests run Triton on the CPU under the interpreter).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from flotilla.kernels import dispatch

MOE_ENV = "FLOTILLA_MOE_BACKEND"

ActAndMul = Callable[[torch.Tensor], torch.Tensor]


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                   weights_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, top_k], expert ids [T, top_k])`` from the router's logits ``[T, E]``: softmax in fp32,
    the ``top_k`` largest probabilities (largest first), renormalised to sum to one if ``renormalize``, then cast
    to ``weights_dtype`` (None keeps fp32, as Mixtral does; Qwen's MoE rounds them to the logits' dtype)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights_dtype is not None:
        weights = weights.to(weights_dtype)
    return weights, ids


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, act_and_mul: ActAndMul) -> torch.Tensor:
    """``[T, H]``: each token's experts' outputs, weighted and summed (see the module doc)."""
    out = torch.zeros_like(x)
    for e in torch.unique(topk_ids).tolist():
        tokens, slots = torch.where(topk_ids == e)
        h = act_and_mul(F.linear(x[tokens], w13[e]))
        y = F.linear(h, w2[e]) * topk_weights[tokens, slots, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, act_and_mul: ActAndMul) -> torch.Tensor:
    """``fused_moe_ref``'s contract, on the implementation the dispatch rule picks."""
    if dispatch.resolve_cached(x.device.type, dispatch.env_override(MOE_ENV)) == "triton":
        from flotilla.kernels.triton_moe import fused_moe as triton_fused_moe  # Linux-only: import when used

        return triton_fused_moe(x, w13, w2, topk_weights, topk_ids, act_and_mul)
    return fused_moe_ref(x, w13, w2, topk_weights, topk_ids, act_and_mul)
