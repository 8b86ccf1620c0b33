"""Multi-LoRA shrink and expand in Triton, twins of ``flotilla.kernels.lora.lora_shrink_ref`` / ``lora_expand_ref``.

One kernel serves both: ``C[t, c0:c0+N] (+)= X[t, x0:x0+K] @ W[slot(t)]ᵀ`` for the tokens that use an adapter,
gathered by ``LoRABatch.sorted_tokens``. The grid is (row blocks, column blocks, segments): program ``(m, n, s)``
takes rows ``m × BLOCK_M ...`` of segment ``s`` (one slot's tokens), so each adapter's weight tile is read once per
row block however the batch mixes adapters, and blocks past a segment's end exit at once. Shrink writes (``N``: the
ranks of every packed part), expand adds into the base layer's output in place. Products accumulate in fp32; fp32
operands stay IEEE fp32 (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flotilla.kernels.lora import LoRABatch


@triton.jit
def _segment_gemm_kernel(
    x_ptr, w_ptr, c_ptr, sorted_ptr, seg_starts_ptr, seg_slots_ptr,
    N, K, x_offset, c_offset,
    stride_xt, stride_xk, stride_ws, stride_wn, stride_wk, stride_ct, stride_cn,
    ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.program_id(2)
    start = tl.load(seg_starts_ptr + seg)
    end = tl.load(seg_starts_ptr + seg + 1)
    first = start + pid_m * BLOCK_M
    if first >= end:
        return
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    offs_m = first + tl.arange(0, BLOCK_M)
    m_ok = offs_m < end
    rows = tl.load(sorted_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xt + (x_offset + offs_k[None, :]) * stride_xk
    w_ptrs = w_ptr + slot * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    c_ptrs = c_ptr + rows[:, None] * stride_ct + (c_offset + offs_n[None, :]) * stride_cn
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _segment_gemm(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, batch: LoRABatch, k: int, x_offset: int,
                  c_offset: int, accumulate: bool) -> None:
    n = w.shape[1]
    longest = max(end - start for _, start, end in batch.segments)
    block_m = 16 if longest <= 16 else 32 if longest <= 64 else 64
    block_n = 64 if n >= 64 else 32 if n >= 32 else 16
    block_k = 64 if k >= 64 else 32 if k >= 32 else 16
    grid = (triton.cdiv(longest, block_m), triton.cdiv(n, block_n), len(batch.segments))
    _segment_gemm_kernel[grid](
        x, w, c, batch.sorted_tokens, batch.seg_starts, batch.seg_slots,
        n, k, x_offset, c_offset,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), c.stride(0), c.stride(1),
        ACCUMULATE=accumulate, IEEE=w.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=2,
    )


def lora_shrink_triton(x: torch.Tensor, a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    y = x.new_zeros(x.shape[0], a.shape[1])
    _segment_gemm(x, a, y, batch, a.shape[2], 0, 0, accumulate=False)
    return y


def lora_expand_triton(y: torch.Tensor, b: torch.Tensor, batch: LoRABatch, out: torch.Tensor, y_offset: int = 0,
                       out_offset: int = 0) -> None:
    _segment_gemm(y, b, out, batch, b.shape[2], y_offset, out_offset, accumulate=True)
