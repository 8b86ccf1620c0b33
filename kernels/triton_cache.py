"""KV-cache writes and block copies in Triton; twins of ``paged_attention.write_kv_cache_ref`` and
``kv_cache.copy_blocks_ref`` with the same signatures. Pure data movement: values are stored exactly
(a cast to the cache dtype is the only change, with the same round-to-nearest-even as torch's ``.to``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kch, stride_kct, stride_vcb, stride_vch, stride_vct,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """One program: one token × one KV head. Slot -1 marks a padding token (e.g. a CUDA-graph pad row)."""
    tok = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        k = tl.load(key_ptr + tok * stride_kt + head * stride_kh + d, mask=d_ok)
        v = tl.load(value_ptr + tok * stride_vt + head * stride_vh + d, mask=d_ok)
        tl.store(k_cache_ptr + block * stride_kcb + head * stride_kch + offset * stride_kct + d,
                 k.to(k_cache_ptr.dtype.element_ty), mask=d_ok)
        tl.store(v_cache_ptr + block * stride_vcb + head * stride_vch + offset * stride_vct + d,
                 v.to(v_cache_ptr.dtype.element_ty), mask=d_ok)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton twin of ``write_kv_cache_ref``: store ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]``
    at flat slots ``block * block_size + offset``; slot -1 is skipped. No host sync (CUDA-graph safe)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[2],
        num_warps=1,
    )


@triton.jit
def _copy_blocks_kernel(
    k_cache_ptr, v_cache_ptr, mapping_ptr, stride_kb, stride_vb,
    BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program: one (src, dst) pair × one CHUNK of the block's contiguous ``[kv_heads, block_size,
    head_dim]`` elements, for K and V."""
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    src = tl.load(mapping_ptr + 2 * pair).to(tl.int64)
    dst = tl.load(mapping_ptr + 2 * pair + 1).to(tl.int64)
    idx = chunk * CHUNK + tl.arange(0, CHUNK)
    ok = idx < BLOCK_NUMEL
    tl.store(k_cache_ptr + dst * stride_kb + idx, tl.load(k_cache_ptr + src * stride_kb + idx, mask=ok), mask=ok)
    tl.store(v_cache_ptr + dst * stride_vb + idx, tl.load(v_cache_ptr + src * stride_vb + idx, mask=ok), mask=ok)


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Triton twin of ``copy_blocks_ref``: ``cache[dst] = cache[src]`` for each ``(src, dst)`` row of
    ``block_mapping`` ``[num_pairs, 2]``. Destinations must be distinct and not among the sources (programs
    run in no particular order)."""
    if block_mapping.numel() == 0:
        return
    for cache in (k_cache, v_cache):
        if not cache[0].is_contiguous():
            raise ValueError("each cache block must be one contiguous [kv_heads, block_size, head_dim] tile")
    block_mapping = block_mapping.to(torch.int64).contiguous()
    numel = k_cache[0].numel()
    chunk = min(4096, triton.next_power_of_2(numel))
    _copy_blocks_kernel[(block_mapping.shape[0], triton.cdiv(numel, chunk))](
        k_cache, v_cache, block_mapping, k_cache.stride(0), v_cache.stride(0),
        BLOCK_NUMEL=numel, CHUNK=chunk, num_warps=4,
    )
