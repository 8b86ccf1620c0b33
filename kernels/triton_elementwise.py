"""Fused elementwise kernels in Triton; twins of the references in ``flotilla.kernels.elementwise`` with
the same signatures. Loads are cast to fp32 and math is fp32; where the reference rounds an intermediate
to the activation dtype (the residual sum, the normalised row before the weight, ``silu(gate)``), the
kernel rounds at the same point, so fp32 agrees to rounding and fp16/bf16 to about one ulp."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D view ``[rows, last]`` with a contiguous last dimension."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(-1, x.shape[-1])


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps,
    stride_x, stride_r, stride_o, stride_ro,
    N: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """One program: one row (a whole hidden vector fits one tile for every model we serve)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        # Rounded to the activation dtype, as the reference's ``residual + x`` is.
        x = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=ok)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``rms_norm_ref`` (RMSNorm, optionally fused with the residual add before it)."""
    shape, n = x.shape, x.shape[-1]
    x2 = _rows(x)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)  # as ``weight * h.to(dtype)`` promotes
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if residual is not None:
        r2 = _rows(residual)
        res_out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    else:
        r2, res_out = x2, out
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out, eps,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            N=n, BLOCK_N=triton.next_power_of_2(n), HAS_RESIDUAL=residual is not None,
            num_warps=4 if n <= 4096 else 8,
        )
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)


@triton.jit
def _rotary_kernel(
    pos_ptr, x_ptr, out_ptr, cos_ptr, sin_ptr,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_cos, stride_sin,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """One program: every head of one token. out = [x1 cos - x2 sin, x2 cos + x1 sin] (rotate-half)."""
    tok = tl.program_id(0)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < HALF
    ok = (h[:, None] < NUM_HEADS) & j_ok[None, :]
    # The tables' two halves are equal; the reference rounds them to the activation dtype first.
    c = tl.load(cos_ptr + pos * stride_cos + j, mask=j_ok, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_sin + j, mask=j_ok, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    base = x_ptr + tok * stride_xt + h[:, None] * stride_xh + j[None, :]
    x1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=ok, other=0.0).to(tl.float32)
    o = out_ptr + tok * stride_ot + h[:, None] * stride_oh + j[None, :]
    dt = out_ptr.dtype.element_ty
    tl.store(o, (x1 * c[None, :] - x2 * s[None, :]).to(dt), mask=ok)
    tl.store(o + HALF, (x2 * c[None, :] + x1 * s[None, :]).to(dt), mask=ok)


def _rotate(positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    tokens, heads, head_dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if tokens:
        half = head_dim // 2
        _rotary_kernel[(tokens,)](
            positions, x, out, cos, sin,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0), sin.stride(0),
            NUM_HEADS=heads, HALF=half, BLOCK_H=triton.next_power_of_2(heads),
            BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
        )
    return out


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``rotary_embedding_ref`` (neox style; llama3 scaling lives in the tables)."""
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return _rotate(positions, q, cos, sin), _rotate(positions, k, cos, sin)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < D
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + D + cols, mask=ok, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)  # rounded where F.silu's result is
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(dt), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of ``silu_and_mul_ref``: ``silu(x[..., :d]) * x[..., d:]``."""
    d = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, x2.stride(0), out.stride(0), D=d, BLOCK=block, num_warps=4,
        )
    return out.view(*x.shape[:-1], d)
