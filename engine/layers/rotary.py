"""Rotary position embedding (neox / rotate-half style): the frequency scalings the served families use (linear,
llama3, Phi-3's LongRoPE) and partial rotation (only the first ``rotary_dim`` features of each head turn)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from flotilla.kernels.elementwise import rotary_embedding


def rope_type(scaling: dict[str, Any] | None) -> str:
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or "default"
    return "longrope" if kind == "su" else kind  # Phi-3's first configs called LongRoPE "su"


def long_factors(scaling: dict[str, Any], max_model_len: int) -> bool:
    """Whether LongRoPE runs on its long factors: for every token when the served context may pass the pretrained
    one (vLLM's rule). transformers instead picks per forward call by the call's longest position, so keys cached
    before a sequence crossed the threshold would disagree with the rotation of the queries after it; one choice per
    engine keeps the cache consistent (set ``max_model_len`` to at most ``original_max_position_embeddings`` for the
    short factors)."""
    return max_model_len > int(scaling["original_max_position_embeddings"])


def attention_factor(scaling: dict[str, Any] | None, max_position: int) -> float:
    """LongRoPE's scale on cos and sin, ``sqrt(1 + ln(s) / ln(original))`` for ``s = max_position / original``
    unless the config gives it; 1 for every other scaling."""
    if rope_type(scaling) != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor") or max_position / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None, long: bool = False) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` in fp32 (``head_dim`` here: the rotated features), rescaled as
    ``scaling`` says: ``linear`` divides by ``factor``; ``llama3`` is Llama 3.1's piecewise rescaling (low
    frequencies slowed by ``factor``, high ones kept, a smooth blend between); ``longrope`` divides each frequency
    by its own factor, the long set when ``long`` (see ``long_factors``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope_type(scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"rope scaling: {factors.numel()} LongRoPE factors for {inv_freq.numel()} frequencies")
        return inv_freq / factors
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3, longrope are)")
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to flattened ``[num_tokens, heads, head_dim]`` queries and keys at given positions. With
    ``rotary_dim < head_dim`` (``partial_rotary_factor``, Phi-4-mini) only the first ``rotary_dim`` features of each
    head turn. ``max_model_len`` is the served context, which picks LongRoPE's factor set."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None,
                 rotary_dim: int | None = None, max_model_len: int | None = None) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        long = rope_type(scaling) == "longrope" and long_factors(scaling, max_model_len or max_position)
        inv_freq = rope_inv_freq(self.rotary_dim, theta, scaling, long)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = attention_factor(scaling, max_position)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)
        self.head_dim = head_dim

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated ``(q, k)``: a Triton kernel on CUDA, the torch reference elsewhere."""
        r = self.rotary_dim
        if r == self.head_dim:
            return rotary_embedding(positions, q, k, self.cos, self.sin)
        q_rot, k_rot = rotary_embedding(positions, q[..., :r].contiguous(), k[..., :r].contiguous(), self.cos,
                                        self.sin)
        return torch.cat((q_rot, q[..., r:]), dim=-1), torch.cat((k_rot, k[..., r:]), dim=-1)
