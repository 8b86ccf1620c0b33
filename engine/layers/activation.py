"""Gated activations: ``act(gate) * up`` for a packed ``[gate | up]`` projection output, by the config's
``hidden_act`` (the dense MLP and every MoE expert apply the same one)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from flotilla.kernels.elementwise import silu_and_mul


def _gelu_and_mul(approximate: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def gelu_and_mul(x: torch.Tensor) -> torch.Tensor:
        """``gelu(gate) * up`` for ``x = [gate | up]`` (Gemma's GeGLU), in transformers' order of operations."""
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=approximate) * up
    return gelu_and_mul


# hidden_act -> the gated activation applied to the packed gate/up output
GATED_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": silu_and_mul,
    "gelu_pytorch_tanh": _gelu_and_mul("tanh"),
    "gelu": _gelu_and_mul("none"),
}


def gated_activation(config) -> Callable[[torch.Tensor], torch.Tensor]:
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"  # Gemma 2/3
    if act not in GATED_ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not supported ({', '.join(sorted(GATED_ACTIVATIONS))} are)")
    return GATED_ACTIVATIONS[act]
