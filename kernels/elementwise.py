"""Fused elementwise ops of the decoder — RMSNorm with the residual add, rotary embedding, SiLU-and-mul —
as torch references (the CPU path and the oracle) plus the single dispatch point the layers call.

Dispatch: Triton (``flotilla.kernels.triton_elementwise``) for CUDA tensors; the compiled kernels
(``flotilla.kernels.cpu_ops``) for CPU tensors inside ``compiled_cpu_kernels()`` (the model runner enters it around
each forward pass when its attention backend is the compiled CPU one), else the reference.
``FLOTILLA_ELEMENTWISE_BACKEND=torch|triton|cpu`` overrides it (tests force Triton on the CPU under
``TRITON_INTERPRET=1``). The references keep the exact order of operations of transformers' Llama, so
fp32 CPU outputs match it bit for bit.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from flotilla.kernels import dispatch

ELEMENTWISE_ENV = "FLOTILLA_ELEMENTWISE_BACKEND"

_compiled_cpu = False  # inside compiled_cpu_kernels()


# ---- references ---------------------------------------------------------------------------------------


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Without ``residual``: ``norm(x)``. With it: ``(norm(x + residual), x + residual)``, the pre-norm
    decoder's residual stream update fused with the next norm. Rows are the last dimension."""
    if residual is not None:
        x = residual + x
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    normed = weight * h.to(dtype)
    return normed if residual is None else (normed, x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) RoPE of ``q`` ``[T, H, D]`` and ``k`` ``[T, KVH, D]`` at ``positions``
    ``[T]``, with ``cos``/``sin`` tables ``[max_position, D]`` (both halves equal; the llama3 frequency
    scaling is baked into them by ``engine.layers.rotary.rope_inv_freq``)."""
    c = cos[positions].unsqueeze(1).to(q.dtype)
    s = sin[positions].unsqueeze(1).to(q.dtype)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` packed on the last dimension (``gate_up_proj``'s output)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---- dispatch -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def compiled_cpu_kernels(enabled: bool = True) -> Iterator[None]:
    """Within it (when ``enabled``), CPU tensors go to the compiled kernels, which must have been loaded
    (``flotilla.kernels.cpu_ops.load``)."""
    global _compiled_cpu
    previous, _compiled_cpu = _compiled_cpu, enabled
    try:
        yield
    finally:
        _compiled_cpu = previous


def _backend(t: torch.Tensor) -> str:
    """triton, cpu or torch for this tensor."""
    override = dispatch.env_override(ELEMENTWISE_ENV)
    if t.device.type == "cpu" and (override == "cpu" or (override == "auto" and _compiled_cpu)):
        return "cpu"
    return dispatch.resolve_cached(t.device.type, override)


def _kernel(backend: str, name: str) -> Callable:
    if backend == "triton":
        from flotilla.kernels import triton_elementwise as module  # triton is Linux-only: import it only when used
    else:
        from flotilla.kernels import cpu_ops as module
    return getattr(module, name)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm_ref``'s contract, on the implementation the dispatch rule picks."""
    backend = _backend(x)
    if backend == "torch":
        return rms_norm_ref(x, weight, eps, residual)
    return _kernel(backend, "rms_norm")(x, weight, eps, residual)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_embedding_ref``'s contract, on the implementation the dispatch rule picks (the compiled CPU
    kernel rotates ``q`` and ``k`` in place)."""
    backend = _backend(q)
    if backend == "torch":
        return rotary_embedding_ref(positions, q, k, cos, sin)
    return _kernel(backend, "rotary_embedding")(positions, q, k, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul_ref``'s contract, on the implementation the dispatch rule picks."""
    backend = _backend(x)
    if backend == "torch":
        return silu_and_mul_ref(x)
    return _kernel(backend, "silu_and_mul")(x)
