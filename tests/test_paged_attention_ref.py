"""The torch paged-attention references against dense attention written out longhand, over random
block tables, GQA ratios, block sizes and context lengths that end mid-block."""

from __future__ import annotations

import math

import pytest
import torch

from flotilla.kernels.paged_attention import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    varlen_causal_attention_ref,
    write_kv_cache_ref,
)


def _dense(q, k, v, scale, q_offset):
    """softmax(q k^T) v for one sequence, with query i at absolute position q_offset + i."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1).double()
    v = v.repeat_interleave(heads // kv_heads, dim=1).double()
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        for h in range(heads):
            pos = q_offset + i
            s = (k[: pos + 1, h] @ q[i, h].double()) * scale
            out[i, h] = torch.softmax(s, dim=0) @ v[: pos + 1, h]
    return out


def _setup(seq_lens, heads, kv_heads, head_dim, block_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(n / block_size) for n in seq_lens) + 5
    k_cache = torch.zeros(num_blocks, kv_heads, block_size, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # non-contiguous, unordered blocks
    width = max(math.ceil(n / block_size) for n in seq_lens)
    tables, keys, values = [], [], []
    for n in seq_lens:
        nb = math.ceil(n / block_size)
        blocks = [perm.pop() for _ in range(nb)]
        tables.append(blocks + [0] * (width - nb))
        k = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(n)])
        write_kv_cache_ref(k, v, k_cache, v_cache, slots)
        keys.append(k)
        values.append(v)
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), keys, values


CASES = [
    # heads, kv_heads, head_dim, block_size
    (4, 4, 64, 16),
    (8, 2, 64, 32),
    (8, 1, 128, 16),
]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_matches_dense_attention(heads, kv_heads, head_dim, block_size, dtype):
    seq_lens = [1, block_size, block_size + 1, 3 * block_size - 5, 70]
    k_cache, v_cache, tables, keys, values = _setup(seq_lens, heads, kv_heads, head_dim, block_size, dtype, 0)
    q = torch.randn(len(seq_lens), heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = paged_decode_attention_ref(q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), scale)
    for i, n in enumerate(seq_lens):
        ref = _dense(q[i:i + 1], keys[i], values[i], scale, n - 1)
        torch.testing.assert_close(out[i:i + 1].double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", CASES)
def test_prefill_over_cached_context_matches_dense_attention(heads, kv_heads, head_dim, block_size):
    seq_lens = [5, 2 * block_size + 3, 40]
    q_lens = [5, 7, 1]  # a fresh prompt, a chunk after cached context, one token
    k_cache, v_cache, tables, keys, values = _setup(seq_lens, heads, kv_heads, head_dim, block_size,
                                                    torch.float32, 1)
    q = torch.randn(sum(q_lens), heads, head_dim)
    qsl = torch.tensor([0, 5, 12, 13], dtype=torch.int32)
    scale = head_dim**-0.5
    out = paged_prefill_attention_ref(q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32),
                                      qsl, scale)
    for i, (n, ql) in enumerate(zip(seq_lens, q_lens)):
        s = int(qsl[i])
        ref = _dense(q[s:s + ql], keys[i], values[i], scale, n - ql)
        torch.testing.assert_close(out[s:s + ql].double(), ref, atol=2e-5, rtol=2e-5)


def test_fresh_varlen_prefill_matches_dense_attention():
    heads, kv_heads, head_dim = 8, 2, 64
    lens = [3, 17, 1]
    q = torch.randn(sum(lens), heads, head_dim)
    k = torch.randn(sum(lens), kv_heads, head_dim)
    v = torch.randn(sum(lens), kv_heads, head_dim)
    qsl = torch.tensor([0, 3, 20, 21], dtype=torch.int32)
    out = varlen_causal_attention_ref(q, k, v, qsl, head_dim**-0.5)
    for i in range(3):
        s, e = int(qsl[i]), int(qsl[i + 1])
        torch.testing.assert_close(out[s:e].double(), _dense(q[s:e], k[s:e], v[s:e], head_dim**-0.5, 0),
                                   atol=2e-5, rtol=2e-5)


def test_padding_slots_are_not_written():
    k_cache = torch.zeros(2, 1, 4, 8)
    v_cache = torch.zeros_like(k_cache)
    key = torch.ones(3, 1, 8)
    write_kv_cache_ref(key, key, k_cache, v_cache, torch.tensor([5, -1, 0]))
    assert k_cache[1, 0, 1].eq(1).all() and k_cache[0, 0, 0].eq(1).all()
    assert int(k_cache.ne(0).any(-1).sum()) == 2
