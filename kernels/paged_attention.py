"""Paged attention: torch references (the CPU path and the test oracle for the Triton kernels).

Layouts, shared by every implementation:
- ``k_cache``/``v_cache``: ``[num_blocks, num_kv_heads, block_size, head_dim]``, one pair per layer, so a
  block of one head is a contiguous ``[block_size, head_dim]`` tile.
- ``block_tables``: ``[num_seqs, max_blocks]`` int32; row ``i`` lists sequence ``i``'s blocks in order.
  Entries past a sequence's last block are padding and never read.
- ``seq_lens``: ``[num_seqs]`` tokens of context per sequence *including* this step's new tokens.
- ``query_start_loc``: ``[num_seqs + 1]`` offsets of each sequence's new tokens in the flattened batch.

Two options every attention call takes (keyword-only, None = off), as Mistral and Gemma 2/3 define them:
- ``window``: sliding-window attention; a query at position ``i`` sees keys ``j`` with ``i - window < j <= i``.
- ``softcap``: logit soft-capping; scores (already scaled) become ``softcap * tanh(score / softcap)``.
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
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    block_size = k_cache.shape[2]
    slots = slot_mapping.long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, :, offsets] = key.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = value.to(v_cache.dtype)


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
            softcap: float | None) -> torch.Tensor:
    """``[H, Q, D]`` queries against ``[H, K, D]`` keys/values under a boolean ``[Q, K]`` mask (True: visible).
    Soft-capping needs the scores themselves, so it is written out (fp32 softmax, as transformers' eager path);
    without it, SDPA."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = _capped(torch.matmul(q, k.transpose(-1, -2)).float() * scale, softcap)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(weights.to(v.dtype), v)


def _causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first ``length`` cached positions, ``[num_kv_heads, length, head_dim]``."""
    num_kv_heads, block_size, head_dim = cache.shape[1:]
    num_blocks = (length + block_size - 1) // block_size
    tiles = cache.index_select(0, block_table[:num_blocks].long())  # [nb, KVH, BS, D]
    return tiles.transpose(0, 1).reshape(num_kv_heads, num_blocks * block_size, head_dim)[:, :length]


def paged_decode_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query token per sequence, ``query`` ``[num_seqs, num_heads, head_dim]``, against the whole paged
    context of that sequence (its own new token included, already written). Returns the same shape.

    Ragged and blockwise, as flash-decoding splits work: only the blocks each sequence really uses are
    gathered (no padding to the longest context), every block yields partial scores, and a
    log-sum-exp merge per sequence combines them. The CPU path thus runs a dozen large ops per layer
    whatever the mix of context lengths."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    device = query.device
    seq_lens = seq_lens.long()
    blocks_per_seq = (seq_lens + block_size - 1) // block_size
    width = int(blocks_per_seq.max())
    slot = torch.arange(width, device=device)
    used = slot[None, :] < blocks_per_seq[:, None]  # [B, width]
    block_ids = block_tables[:, :width][used].long()  # every used block, grouped by sequence
    owner = torch.arange(num_seqs, device=device)[:, None].expand(num_seqs, width)[used]
    first_pos = slot[None, :].expand(num_seqs, width)[used] * block_size
    positions = first_pos[:, None] + torch.arange(block_size, device=device)[None, :]
    beyond = positions >= seq_lens[owner][:, None]  # [num_used, block_size]
    if window is not None:  # the query sits at seq_len - 1: keys at or before seq_len - 1 - window are out of view
        beyond |= positions < (seq_lens[owner] - window)[:, None]

    keys = k_cache.index_select(0, block_ids)  # [N, KVH, BS, D]
    values = v_cache.index_select(0, block_ids)
    q = query.view(num_seqs, num_kv_heads, group, head_dim).to(keys.dtype).index_select(0, owner)
    scores = _capped(torch.matmul(q, keys.transpose(-1, -2)).float() * scale, softcap)  # [N, KVH, G, BS]
    scores.masked_fill_(beyond[:, None, None, :], float("-inf"))
    block_max = scores.amax(dim=-1)  # [N, KVH, G]
    seq_max = torch.full((num_seqs, num_kv_heads, group), float("-inf"), device=device)
    seq_max.scatter_reduce_(0, owner[:, None, None].expand_as(block_max), block_max, "amax")
    weights = torch.exp(scores - seq_max.index_select(0, owner)[..., None])
    denom = torch.zeros(num_seqs, num_kv_heads, group, device=device).index_add_(0, owner, weights.sum(dim=-1))
    partial = torch.matmul(weights.to(values.dtype), values).float()  # [N, KVH, G, D]
    out = torch.zeros(num_seqs, num_kv_heads, group, head_dim, device=device).index_add_(0, owner, partial)
    return (out / denom[..., None]).reshape(num_seqs, num_heads, head_dim).to(query.dtype)


def paged_prefill_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention for spans of new tokens ``query`` ``[num_tokens, num_heads, head_dim]`` whose
    earlier context (prefix-cache hits, earlier prefill chunks) already sits in the paged cache. The new
    tokens' own K/V must have been written already. Sequence ``i``'s queries are its last
    ``query_start_loc[i+1] - query_start_loc[i]`` positions of ``seq_lens[i]``."""
    num_heads = query.shape[1]
    num_kv_heads = k_cache.shape[1]
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        keys = _gather_context(k_cache, block_tables[i], seq_len)  # [KVH, L, D]
        values = _gather_context(v_cache, block_tables[i], seq_len)
        if num_heads != num_kv_heads:
            keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=0)
            values = values.repeat_interleave(num_heads // num_kv_heads, dim=0)
        q = query[q_start:q_end].transpose(0, 1)  # [H, q_len, D]
        # Query j sits at absolute position seq_len - q_len + j and sees keys up to that position.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        o = _attend(q, keys.to(q.dtype), values.to(q.dtype), _causal_mask(q_pos, k_pos, window), scale, softcap)
        out[q_start:q_end] = o.transpose(0, 1)
    return out


def varlen_causal_attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
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
        q, k, v = query[s:e].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if window is None and softcap is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            pos = torch.arange(e - s, device=query.device)
            o = _attend(q, k, v, _causal_mask(pos, pos, window), scale, softcap)
        out[s:e] = o.transpose(0, 1)
    return out
