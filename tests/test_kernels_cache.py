"""The Triton KV-cache writes and block copies against their torch references: pure data movement, so
the results must be bit-identical (the only arithmetic is a cast to the cache dtype)."""

from __future__ import annotations


import pytest
import torch

from kernel_cases import DEVICE, DTYPES  # noqa: E402  (first: it sets TRITON_INTERPRET)

from flotilla.kernels.kv_cache import copy_blocks_ref  # noqa: E402
from flotilla.kernels.paged_attention import write_kv_cache_ref  # noqa: E402
from flotilla.kernels.triton_cache import copy_blocks, write_kv_cache  # noqa: E402



@pytest.mark.parametrize("cache_dtype", DTYPES)
@pytest.mark.parametrize("head_dim, block_size", [(64, 16), (128, 32), (96, 16)])
def test_cache_write_is_bit_identical_to_reference(cache_dtype, head_dim, block_size):
    g = torch.Generator().manual_seed(head_dim)
    num_blocks, kv_heads, tokens = 9, 2, 23
    # Random distinct slots in random blocks, with two padding tokens (-1) that must not be stored.
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[[4, 17]] = -1
    # fp32 new K/V into a lower-precision cache exercises the cast; non-contiguous like qkv's split.
    kv = torch.randn(tokens, 2 * kv_heads, head_dim, generator=g)
    key, value = kv[:, :kv_heads], kv[:, kv_heads:]
    base = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g).to(cache_dtype)
    k_ref, v_ref = base.clone(), (base * 2).clone()
    write_kv_cache_ref(key, value, k_ref, v_ref, slots)
    k_out, v_out = base.clone().to(DEVICE), (base * 2).clone().to(DEVICE)
    write_kv_cache(key.to(DEVICE), value.to(DEVICE), k_out, v_out, slots.to(DEVICE))
    assert torch.equal(k_out.cpu(), k_ref) and torch.equal(v_out.cpu(), v_ref)


def test_cache_write_into_per_layer_views_of_one_allocation():
    """The model runner hands each layer ``cache[layer, 0/1]`` views; writes must land in the right layer."""
    cache = torch.zeros(2, 2, 4, 2, 16, 64, device=DEVICE)
    key = torch.randn(3, 2, 64, device=DEVICE)
    slots = torch.tensor([0, 17, 63], device=DEVICE)
    write_kv_cache(key, -key, cache[1, 0], cache[1, 1], slots)
    ref = torch.zeros(2, 2, 4, 2, 16, 64)
    write_kv_cache_ref(key.cpu(), -key.cpu(), ref[1, 0], ref[1, 1], slots.cpu())
    assert torch.equal(cache.cpu(), ref) and cache[0].eq(0).all()


@pytest.mark.parametrize("cache_dtype", DTYPES)
def test_block_copy_is_bit_identical_to_reference(cache_dtype):
    g = torch.Generator().manual_seed(0)
    # Per-layer views of one [layers, 2, blocks, kv_heads, block_size, head_dim] allocation.
    cache = torch.randn(2, 2, 12, 2, 16, 64, generator=g).to(cache_dtype)
    mapping = torch.tensor([[3, 7], [0, 11], [5, 1], [9, 2]])
    ref = cache.clone()
    out = cache.clone().to(DEVICE)
    for layer in range(2):
        copy_blocks_ref(ref[layer, 0], ref[layer, 1], mapping)
        copy_blocks(out[layer, 0], out[layer, 1], mapping.to(DEVICE))
    assert torch.equal(out.cpu(), ref)
    assert torch.equal(ref[0, 0, 7], cache[0, 0, 3]) and torch.equal(ref[1, 1, 2], cache[1, 1, 9])


def test_empty_writes_and_copies_are_no_ops():
    cache = torch.ones(2, 1, 16, 64, device=DEVICE)
    write_kv_cache(torch.empty(0, 1, 64, device=DEVICE), torch.empty(0, 1, 64, device=DEVICE), cache, cache,
                   torch.empty(0, dtype=torch.long, device=DEVICE))
    copy_blocks(cache, cache, torch.empty(0, 2, dtype=torch.long, device=DEVICE))
    assert cache.eq(1).all()
