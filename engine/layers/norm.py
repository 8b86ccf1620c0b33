"""RMSNorm, optionally fused with the residual add that precedes it in pre-norm decoders."""

from __future__ import annotations

import torch
from torch import nn

from flotilla.engine.layers.linear import load_whole
from flotilla.kernels.elementwise import rms_norm


class RMSNorm(nn.Module):
    """``offset``: checkpoints that store the scale as ``weight - offset`` (Gemma's ``(1 + w)``, offset 1). The offset is
    added once as the weight loads, in fp32, as transformers adds it, so the forward pass is Llama's."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        if offset:
            self.weight.weight_loader = lambda param, loaded, shard=None: load_whole(param, loaded.float() + offset)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: ``norm(x)``. With it: ``(norm(x + residual), x + residual)``. One fused
        Triton kernel on CUDA; on the CPU the reference, in transformers' LlamaRMSNorm order of operations
        so fp32 results match it bit for bit (``flotilla.kernels.elementwise``)."""
        return rms_norm(x, self.weight, self.eps, residual)
