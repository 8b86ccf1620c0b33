"""Fused mixture-of-experts in Triton: a grouped GEMM over experts, twin of ``flotilla.kernels.moe.fused_moe_ref``.

The ``T × top_k`` (token, expert) pairs are grouped by expert and each group padded to a multiple of ``BLOCK_M``
(``align_by_expert``), so every ``BLOCK_M`` rows of the grouped order belong to one expert. One program computes a
``BLOCK_M × BLOCK_N`` tile of one expert's product: it gathers its rows' activations by index, streams the expert's
weight tile once for all of them, and scatters the result back to the pairs' rows. Two launches make the layer:
``x @ w13[e]ᵀ`` for every pair, the gated activation, then ``@ w2[e]ᵀ`` scaled by the routing weight; the pairs
are summed per token at the end.

Everything is sized from ``T``, ``top_k`` and the expert count alone (the grouping is computed on the device with
a bound on the number of blocks, blocks past the end exit at once): no host sync, so CUDA graphs can capture it.
Products accumulate in fp32; fp32 operands stay IEEE fp32 (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flotilla.kernels.moe import ActAndMul


def block_m_for(pairs: int, num_experts: int) -> int:
    """Rows per tile: small when each expert sees few rows (decode), so little of a tile is padding."""
    per_expert = pairs / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the flattened (token, slot) pairs by expert, each expert's group padded to whole blocks.

    Returns ``sorted_pairs`` (int32, ``[num_blocks × block_m]``: the pair index ``token × top_k + slot`` at each
    grouped row, ``pairs`` on padding rows) and ``block_expert`` (int32, ``[num_blocks]``: the expert of each block,
    -1 past the last used block). ``num_blocks = ceil(pairs / block_m) + num_experts`` bounds the blocks any routing
    can need, so the shapes depend on the sizes only."""
    flat = topk_ids.reshape(-1).long()
    pairs = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    count_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    dest = padded_start[expert_of] + torch.arange(pairs, device=dev) - count_start[expert_of]
    num_blocks = -(-pairs // block_m) + num_experts
    sorted_pairs = torch.full((num_blocks * block_m,), pairs, dtype=torch.int32, device=dev)
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, c_ptr, scale_ptr, sorted_pairs_ptr, block_expert_ptr,
    pairs, N, K,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
    TOP_K: tl.constexpr, ROW_PER_PAIR: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[pair, n-tile] = A[row of pair] @ W[expert]ᵀ (× scale[pair]) for one block of grouped pairs. A's row is the
    pair itself (ROW_PER_PAIR: the second GEMM's input) or the pair's token (``pair // TOP_K``: the layer input)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    pair = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = pair < pairs
    if ROW_PER_PAIR:
        row = pair
    else:
        row = pair // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if SCALE:
        acc = acc * tl.load(scale_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_pairs: torch.Tensor,
                  block_expert: torch.Tensor, top_k: int, row_per_pair: bool, block_m: int,
                  scale: torch.Tensor | None = None) -> None:
    _, n, k = w.shape
    block_n = 64 if n >= 64 else 32
    block_k = 64 if k >= 64 else 32
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, w, out, scale if scale is not None else out, sorted_pairs, block_expert,
        out.shape[0], n, k,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        TOP_K=top_k, ROW_PER_PAIR=row_per_pair, SCALE=scale is not None, IEEE=w.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3,
    )


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, act_and_mul: ActAndMul) -> torch.Tensor:
    """Triton twin of ``fused_moe_ref``."""
    tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    top_k = topk_ids.shape[1]
    pairs = tokens * top_k
    if pairs == 0:
        return torch.zeros_like(x)
    block_m = block_m_for(pairs, num_experts)
    sorted_pairs, block_expert = align_by_expert(topk_ids, num_experts, block_m)
    gate_up = torch.empty(pairs, two_inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, sorted_pairs, block_expert, top_k, False, block_m)
    h = act_and_mul(gate_up)
    out = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    _grouped_gemm(h, w2, out, sorted_pairs, block_expert, top_k, True, block_m,
                  scale=topk_weights.reshape(-1).contiguous())
    return out.view(tokens, top_k, hidden).sum(dim=1)
