"""The fused elementwise Triton kernels (RMSNorm + residual, rotary, SiLU-and-mul) against their torch
references, and the dispatch rule that picks between them.

Tolerances (absolute = relative), kernel vs reference: fp32 1e-5 (only reduction order and rsqrt/exp
rounding differ); fp16 2e-3 (the reference rounds every intermediate to fp16, the kernel only where the
reference's result is stored: about one fp16 ulp); bf16 on CUDA only, 2e-2.
"""

from __future__ import annotations


import pytest
import torch

from kernel_cases import DEVICE, DTYPES  # noqa: E402  (first: it sets TRITON_INTERPRET)

from flotilla.engine.layers.rotary import rope_inv_freq  # noqa: E402
from flotilla.kernels import elementwise  # noqa: E402
from flotilla.kernels.elementwise import (  # noqa: E402
    ELEMENTWISE_ENV,
    rms_norm_ref,
    rotary_embedding_ref,
    silu_and_mul_ref,
)
from flotilla.kernels.triton_elementwise import rms_norm, rotary_embedding, silu_and_mul  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _close(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 1000])  # 1000: not a power of two, masked tail
def test_rms_norm_with_and_without_residual_matches_reference(dtype, hidden):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden, generator=g).to(dtype).to(DEVICE)
    residual = torch.randn(7, hidden, generator=g).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(DEVICE)
    _close(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6), dtype)
    out, res = rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_res = rms_norm_ref(x, weight, 1e-5, residual)
    _close(out, ref_out, dtype)
    assert torch.equal(res, ref_res)  # the residual sum is one correctly rounded add in both


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}],
                         ids=["default", "llama3"])
def test_rotary_embedding_matches_reference(dtype, head_dim, scaling):
    inv_freq = rope_inv_freq(head_dim, 500000.0, scaling)
    freqs = torch.outer(torch.arange(256, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    g = torch.Generator().manual_seed(head_dim)
    heads, kv_heads, tokens = 8, 2, 9
    # Non-contiguous q and k, as split from the packed qkv projection.
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(DEVICE)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 2, 31, 64, 65, 100, 200, 255], device=DEVICE)
    out_q, out_k = rotary_embedding(positions, q, k, cos, sin)
    ref_q, ref_k = rotary_embedding_ref(positions, q, k, cos, sin)
    _close(out_q, ref_q, dtype)
    _close(out_k, ref_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [128, 1000])
def test_silu_and_mul_matches_reference(dtype, inter):
    x = (3 * torch.randn(2, 5, 2 * inter, generator=torch.Generator().manual_seed(inter))).to(dtype).to(DEVICE)
    _close(silu_and_mul(x), silu_and_mul_ref(x), dtype)


def test_dispatch_uses_the_reference_off_cuda_unless_triton_is_forced(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # forcing Triton on CPU tensors needs it (set already without CUDA)
    x = torch.randn(3, 64)
    w = torch.ones(64)
    calls = []
    monkeypatch.setattr("flotilla.kernels.triton_elementwise.rms_norm",
                        lambda *a: calls.append("triton") or rms_norm_ref(*a))
    monkeypatch.delenv(ELEMENTWISE_ENV, raising=False)
    assert torch.equal(elementwise.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)) and not calls
    monkeypatch.setenv(ELEMENTWISE_ENV, "triton")
    elementwise.rms_norm(x, w, 1e-6)
    assert calls == ["triton"]
    monkeypatch.setenv(ELEMENTWISE_ENV, "bogus")
    with pytest.raises(ValueError):
        elementwise.rms_norm(x, w, 1e-6)
