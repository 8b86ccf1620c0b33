"""Mixture-of-experts: the router's expert choice against transformers' own routers, the grouping of (token, expert)
pairs into per-expert blocks, and the fused Triton grouped GEMM against the torch reference over expert counts,
top-k and token counts (under the interpreter on a CPU).

Tolerances (absolute = relative), kernel vs reference: fp32 1e-5 (the order of the sum over a token's experts
differs); fp16 1e-2 (the kernel rounds the gate/up product once, the reference as F.linear does; products of
~0.1-scale weights summed over 64-96 terms).
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, DTYPES  # noqa: E402  (first: it sets TRITON_INTERPRET)

from flotilla.kernels import moe  # noqa: E402
from flotilla.kernels.elementwise import silu_and_mul_ref  # noqa: E402
from flotilla.kernels.moe import MOE_ENV, fused_moe_ref, select_experts  # noqa: E402
from flotilla.kernels.triton_moe import align_by_expert, block_m_for, fused_moe  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _experts(num_experts, hidden, inter, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = (0.1 * torch.randn(num_experts, 2 * inter, hidden, generator=g)).to(dtype).to(DEVICE)
    w2 = (0.1 * torch.randn(num_experts, hidden, inter, generator=g)).to(dtype).to(DEVICE)
    return w13, w2


def _routing(tokens, num_experts, top_k, hidden, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, hidden, generator=g).to(dtype).to(DEVICE)
    logits = torch.randn(tokens, num_experts, generator=g).to(DEVICE)
    weights, ids = select_experts(logits, top_k, renormalize=True)
    return x, weights, ids


@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (4, 2), (8, 2), (16, 4), (60, 8)])
@pytest.mark.parametrize("tokens", [1, 7, 130])
def test_grouping_puts_every_pair_once_in_a_block_of_its_expert(num_experts, top_k, tokens):
    g = torch.Generator().manual_seed(tokens * 100 + num_experts)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    pairs = tokens * top_k
    block_m = block_m_for(pairs, num_experts)
    sorted_pairs, block_expert = align_by_expert(ids, num_experts, block_m)
    assert sorted_pairs.numel() == block_expert.numel() * block_m
    flat = ids.reshape(-1).tolist()
    seen = []
    for b, expert in enumerate(block_expert.tolist()):
        rows = sorted_pairs[b * block_m:(b + 1) * block_m].tolist()
        if expert < 0:  # past the last used block: padding only, and every later block too
            assert all(r == pairs for r in rows) and all(e < 0 for e in block_expert[b:].tolist())
            continue
        real = [r for r in rows if r != pairs]
        assert real and all(flat[r] == expert for r in real)  # no empty block is handed out
        assert rows[:len(real)] == real  # padding only at a group's end
        seen += real
    assert sorted(seen) == list(range(pairs))
    used = [e for e in block_expert.tolist() if e >= 0]
    assert used == sorted(used)  # grouped in expert order
    for e in set(flat):  # each expert gets exactly the blocks its pairs fill
        assert used.count(e) == -(-flat.count(e) // block_m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (4, 2), (8, 2), (16, 4)])
@pytest.mark.parametrize("tokens", [1, 5, 33, 130])
def test_fused_moe_kernel_matches_reference(dtype, num_experts, top_k, tokens):
    hidden, inter = 64, 96  # 2 x 96 = 192 output rows and a 96-wide input: masked N and K tails
    w13, w2 = _experts(num_experts, hidden, inter, dtype, seed=num_experts)
    x, weights, ids = _routing(tokens, num_experts, top_k, hidden, dtype, seed=tokens)
    out = fused_moe(x, w13, w2, weights, ids, silu_and_mul_ref)
    ref = fused_moe_ref(x, w13, w2, weights, ids, silu_and_mul_ref)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape == (tokens, hidden)
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=TOL[dtype], rtol=TOL[dtype])


def test_reference_is_each_tokens_weighted_sum_of_its_experts():
    """The oracle itself, against the definition written per token: sum_j w_j * down_j(silu(gate_j x) * up_j x)."""
    num_experts, top_k, hidden, inter = 6, 3, 16, 24
    w13, w2 = _experts(num_experts, hidden, inter, torch.float64, seed=3)
    x, weights, ids = _routing(9, num_experts, top_k, hidden, torch.float64, seed=9)
    weights = weights.double()
    out = fused_moe_ref(x, w13, w2, weights, ids, silu_and_mul_ref)
    for t in range(9):
        want = sum(weights[t, j] * (w2[e] @ (torch.nn.functional.silu(w13[e, :inter] @ x[t]) * (w13[e, inter:] @ x[t])))
                   for j, e in enumerate(ids[t].tolist()))
        torch.testing.assert_close(out[t], want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("family,norm_topk_prob", [("mixtral", True), ("qwen3_moe", True), ("qwen3_moe", False)])
def test_expert_choice_matches_transformers_routers(family, norm_topk_prob):
    """The experts and weights transformers' own router modules pick, for Mixtral (always renormalised, fp32
    weights) and Qwen3-MoE (renormalised when ``norm_topk_prob``, weights in the logits' dtype)."""
    import transformers

    if family == "mixtral":  # always renormalises
        config = transformers.MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
        router = transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter(config)
        weights_dtype = None
    else:
        config = transformers.Qwen3MoeConfig(hidden_size=32, num_experts=16, num_experts_per_tok=4,
                                             norm_topk_prob=norm_topk_prob)
        router = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter(config)
        weights_dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        router = router.to(torch.bfloat16)
        x = torch.randn(11, 32, generator=g).to(torch.bfloat16)
        logits, hf_weights, hf_ids = router(x)
    weights, ids = select_experts(logits, config.num_experts_per_tok, norm_topk_prob, weights_dtype)
    assert torch.equal(ids, hf_ids)
    assert weights.dtype == hf_weights.dtype and torch.equal(weights, hf_weights)


def test_dispatch_uses_the_reference_off_cuda_unless_triton_is_forced(monkeypatch):
    calls = []
    monkeypatch.setattr(moe, "fused_moe_ref", lambda *a: calls.append("torch") or fused_moe_ref(*a))
    w13, w2 = _experts(4, 64, 32, torch.float32, seed=1)
    x, weights, ids = _routing(3, 4, 2, 64, torch.float32, seed=1)
    monkeypatch.setenv(MOE_ENV, "torch")
    moe.fused_moe(x, w13, w2, weights, ids, silu_and_mul_ref)
    monkeypatch.setenv(MOE_ENV, "triton")
    moe.fused_moe(x, w13, w2, weights, ids, silu_and_mul_ref)
    assert calls == ["torch"]
    monkeypatch.setenv(MOE_ENV, "auto")
    moe.fused_moe(x, w13, w2, weights, ids, silu_and_mul_ref)
    assert calls == (["torch", "torch"] if DEVICE == "cpu" else ["torch"])
