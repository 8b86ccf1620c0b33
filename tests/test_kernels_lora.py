"""Multi-LoRA kernels: the per-step grouping of tokens by adapter slot, the torch references against a per-token
loop (the definition), and the Triton shrink/expand against the references over mixes of adapters and tokens with
none (under the interpreter on a CPU).

Tolerances (absolute = relative), Triton vs reference: fp32 1e-5 (summation order); fp16 1e-2 (one rounding of
products summed over up to 96 terms of ~0.1-scale values).
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, DTYPES  # noqa: E402  (first: it sets TRITON_INTERPRET)

from flotilla.kernels import lora  # noqa: E402
from flotilla.kernels.lora import LORA_ENV, lora_batch, lora_expand_ref, lora_shrink_ref  # noqa: E402
from flotilla.kernels.triton_lora import lora_expand_triton, lora_shrink_triton  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}

# token slots: -1 = base model. Uniform, mixed with base tokens, two adapters (one GEMM per slot on the torch path),
# interleaved and a long prefill of one adapter beside decodes of others (every slot used: dense on the torch path).
SLOT_MIXES = {
    "one-adapter": [2] * 5,
    "with-base": [-1, 0, -1, 0, 0, -1],
    "two-adapters": [1, 0, 0, -1, 1],
    "interleaved": [1, 0, 3, 1, 0, 3, -1, 2, 2, 1],
    "prefill+decodes": [0, 3, 1] + [2] * 70 + [-1] * 5,
}


def _stack(slots, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(slots, n, k, generator=g)).to(dtype).to(DEVICE)


def _x(tokens, width, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, width, generator=g).to(dtype).to(DEVICE)


def test_the_torch_path_goes_dense_with_many_slots_and_few_tokens():
    assert not lora_batch(SLOT_MIXES["two-adapters"], "cpu").dense
    assert lora_batch(SLOT_MIXES["interleaved"], "cpu").dense
    assert not lora_batch([0, 1, 2] * 200, "cpu").dense  # 600 tokens: a GEMM per slot


def test_batch_groups_tokens_by_slot_and_is_none_without_adapters():
    assert lora_batch([-1, -1], "cpu") is None
    b = lora_batch([1, -1, 0, 1], "cpu")
    assert b.segments == [(0, 0, 1), (1, 1, 3)] and b.uniform is None
    assert b.sorted_tokens.tolist() == [2, 0, 3] and b.seg_starts.tolist() == [0, 1, 3]
    assert b.seg_slots.tolist() == [0, 1]
    assert lora_batch([3, 3], "cpu").uniform == 3
    assert lora_batch([3, 3, -1], "cpu").uniform is None  # a base token needs its zeros


@pytest.mark.parametrize("mix", list(SLOT_MIXES))
def test_references_equal_the_per_token_definition(mix):
    slots = SLOT_MIXES[mix]
    x = _x(len(slots), 48, torch.float64, 0)
    a = _stack(4, 24, 48, torch.float64, 1)  # 3 parts x rank 8
    b = _stack(4, 40, 8, torch.float64, 2)
    batch = lora_batch(slots, DEVICE)
    y = lora_shrink_ref(x, a, batch)
    out = _x(len(slots), 100, torch.float64, 3)
    expected = out.clone()
    lora_expand_ref(y, b, batch, out, y_offset=8, out_offset=30)
    for t, s in enumerate(slots):
        want = torch.zeros(24, dtype=torch.float64) if s < 0 else a[s] @ x[t]
        torch.testing.assert_close(y[t], want)
        if s >= 0:
            expected[t, 30:70] += b[s] @ y[t, 8:16]
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mix", list(SLOT_MIXES))
@pytest.mark.parametrize("hidden,rank,parts", [(64, 8, 3), (96, 16, 1), (40, 4, 2)])
def test_triton_shrink_and_expand_equal_the_references(dtype, mix, hidden, rank, parts):
    slots = SLOT_MIXES[mix]
    tol = TOL[dtype]
    x = _x(len(slots), hidden, dtype, 10)
    a = _stack(4, parts * rank, hidden, dtype, 11)
    batch = lora_batch(slots, DEVICE)
    y_ref = lora_shrink_ref(x, a, batch)
    y = lora_shrink_triton(x, a, batch)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    out_cols = 24
    b = _stack(4, out_cols, rank, dtype, 12)
    base = _x(len(slots), parts * out_cols + 5, dtype, 13)
    out_ref, out = base.clone(), base.clone()
    for p in range(parts):  # one call per packed part, as the layers make them
        lora_expand_ref(y_ref, b, batch, out_ref, y_offset=p * rank, out_offset=5 + p * out_cols)
        lora_expand_triton(y_ref, b, batch, out, y_offset=p * rank, out_offset=5 + p * out_cols)
    torch.testing.assert_close(out, out_ref, atol=tol, rtol=tol)
    untouched = [t for t, s in enumerate(slots) if s < 0]
    assert torch.equal(out[untouched], base[untouched])  # base tokens' outputs are left as they were


def test_dispatch_follows_the_override(monkeypatch):
    slots = SLOT_MIXES["interleaved"]
    x = _x(len(slots), 32, torch.float32, 20)
    a = _stack(4, 8, 32, torch.float32, 21)
    batch = lora_batch(slots, DEVICE)
    called = []
    monkeypatch.setattr("flotilla.kernels.triton_lora.lora_shrink_triton",
                        lambda *args: called.append("triton") or lora_shrink_ref(*args))
    monkeypatch.setenv(LORA_ENV, "triton")
    lora.lora_shrink(x, a, batch)
    monkeypatch.setenv(LORA_ENV, "torch")
    lora.lora_shrink(x, a, batch)
    assert called == ["triton"]
