"""The paged attention layer: stores this step's K/V into its cache and attends through the backend."""

from __future__ import annotations

import torch
from torch import nn

from flotilla.engine.attention import AttentionBackend, get_forward_context


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None) -> None:
        """``sliding_window``: this layer sees the last ``sliding_window`` positions only; ``softcap``: its scores
        are soft-capped (Gemma 2). Both go to every backend call (kernels/paged_attention.py)."""
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.options = {name: value for name, value in (("window", sliding_window), ("softcap", softcap))
                        if value is not None}
        # Bound by the model runner once the KV pool exists: views into one allocation.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.backend: AttentionBackend | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` ``[T, H, D]``, ``k``/``v`` ``[T, KVH, D]`` -> ``[T, H * D]``."""
        meta = get_forward_context()
        backend = self.backend
        assert backend is not None and self.k_cache is not None, "KV cache not bound to the attention layer"
        backend.write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        if nd == q.shape[0]:
            out = backend.decode(q, self.k_cache, self.v_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                 self.scale, **self.options)
            return out.reshape(q.shape[0], -1)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = backend.decode(q[:nd], self.k_cache, self.v_cache, meta.decode_block_tables,
                                      meta.decode_seq_lens, self.scale, **self.options)
        if meta.prefill_has_context or backend.prefill_from_cache:
            out[nd:] = backend.prefill_paged(q[nd:], self.k_cache, self.v_cache, meta.prefill_block_tables,
                                             meta.prefill_seq_lens, meta.prefill_query_start_loc, self.scale,
                                             **self.options)
        else:
            out[nd:] = backend.prefill_fresh(q[nd:], k[nd:], v[nd:], meta.prefill_query_start_loc, self.scale,
                                             **self.options)
        return out.reshape(q.shape[0], -1)
