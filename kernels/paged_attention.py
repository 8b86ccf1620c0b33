"""Paged attention: torch references (the CPU path and the test oracle for the Triton kernels).

Layouts, shared by every implementation:
- ``k_cache``/``v_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``, one pair per layer.
- ``block_tables``: ``[num_seqs, max_blocks]`` int32; row ``i`` lists sequence ``i``'s blocks in order.
  Entries past a sequence's last block are padding and never read.
- ``seq_lens``: ``[num_seqs]`` tokens of context per sequence *including* this step's new tokens.
- ``query_start_loc``: ``[num_seqs + 1]`` offsets of each sequence's new tokens in the flattened batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` at flat slots
    ``block * block_size + offset``. A slot of -1 marks a padding token that is not stored."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    slots = slot_mapping.long()
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value.to(v_cache.dtype))


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first ``length`` cached rows, ``[length, num_kv_heads, head_dim]``."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    rows = cache[block_table[:num_blocks].long()]
    return rows.reshape(-1, cache.shape[2], cache.shape[3])[:length]


def paged_decode_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence, ``query`` ``[num_seqs, num_heads, head_dim]``, against the whole paged
    context of that sequence (its own new token included, already written). Returns the same shape.

    Batched over sequences by gathering every table to the longest context and masking the tail, so the
    CPU path issues one matmul per layer rather than one per sequence."""
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = int(seq_lens.max())
    max_blocks = (max_len + block_size - 1) // block_size
    table = block_tables[:, :max_blocks].long()
    length = max_blocks * block_size
    # [B, L, KVH, D] -> [B, KVH, L, D]
    keys = k_cache[table].view(num_seqs, length, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache[table].view(num_seqs, length, num_kv_heads, head_dim).transpose(1, 2)
    q = query.view(num_seqs, num_kv_heads, group, head_dim).to(keys.dtype)
    scores = torch.matmul(q, keys.transpose(2, 3)).float() * scale  # [B, KVH, G, L]
    pad = torch.arange(length, device=query.device)[None, :] >= seq_lens[:, None]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values)  # [B, KVH, G, D]
    return out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)


def paged_prefill_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention for spans of new tokens ``query`` ``[num_tokens, num_heads, head_dim]`` whose
    earlier context (prefix-cache hits, earlier prefill chunks) already sits in the paged cache. The new
    tokens' own K/V must have been written already. Sequence ``i``'s queries are its last
    ``query_start_loc[i+1] - query_start_loc[i]`` positions of ``seq_lens[i]``."""
    num_heads = query.shape[1]
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        keys = _gather_context(k_cache, block_tables[i], seq_len)
        values = _gather_context(v_cache, block_tables[i], seq_len)
        if num_heads != num_kv_heads:
            keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=1)
            values = values.repeat_interleave(num_heads // num_kv_heads, dim=1)
        q = query[q_start:q_end].transpose(0, 1)  # [H, q_len, D]
        # Query j sits at absolute position seq_len - q_len + j and sees keys up to that position.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            q, keys.transpose(0, 1).to(q.dtype), values.transpose(0, 1).to(q.dtype), attn_mask=mask, scale=scale
        )
        out[q_start:q_end] = o.transpose(0, 1)
    return out


def varlen_causal_attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of prompts with no cached context: each sequence attends to its own new K/V only,
    so nothing is read back from the paged cache (the common first-prefill case)."""
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for i in range(len(starts) - 1):
        s, e = starts[i], starts[i + 1]
        if e == s:
            continue
        k, v = key[s:e], value[s:e]
        if num_heads != num_kv_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        o = F.scaled_dot_product_attention(
            query[s:e].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale
        )
        out[s:e] = o.transpose(0, 1)
    return out
