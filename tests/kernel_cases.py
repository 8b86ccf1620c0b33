"""Shared set-up of the kernel tests. Import it before any Triton kernel: without CUDA it switches on the
interpreter, which Triton reads when a kernel is defined."""

from __future__ import annotations

import math
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# fp32 and fp16 everywhere; bf16 only on a GPU, since the interpreter's bf16 arithmetic is wrong.
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16",
                 marks=pytest.mark.skipif(DEVICE != "cuda", reason="bf16 needs CUDA: the interpreter's bf16 is wrong")),
]


def paged_setup(seq_lens: list[int], kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                seed: int, extra_width: int = 2, device: str = DEVICE):
    """A cache whose sequences own random, unordered blocks (with spare blocks and padded table rows that
    must never be read), filled with random K/V. Returns caches, block tables, and each sequence's
    K/V ``[len, kv_heads, head_dim]``."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(need) + 7
    # Garbage, not zeros, in unused blocks: a kernel that reads past a context would be caught.
    k_cache = (torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g) * 100).to(dtype)
    v_cache = (torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g) * 100).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need) + extra_width
    tables, keys, values = [], [], []
    for n, nb in zip(seq_lens, need):
        blocks = [perm.pop() for _ in range(nb)]
        tables.append(blocks + [perm[0]] * (width - nb))  # padding points at a real (garbage) block
        k = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
        for p in range(n):
            k_cache[blocks[p // block_size], :, p % block_size] = k[p]
            v_cache[blocks[p // block_size], :, p % block_size] = v[p]
        keys.append(k)
        values.append(v)
    return (k_cache.to(device), v_cache.to(device), torch.tensor(tables, dtype=torch.int32, device=device), keys,
            values)


def context_lengths(block_size: int) -> list[int]:
    """1 token, a block minus one, exactly one block, one block plus one, several blocks plus a partial."""
    return [1, block_size - 1, block_size, block_size + 1, 4 * block_size + 5]
