"""The Triton paged-attention kernels against their torch references, over random non-contiguous block
tables, mixed context lengths (1 token, exact blocks, several blocks plus a partial one), GQA 1/4/8,
head_dim 64/128, block sizes 16/32, and split-K on and off.

Runs on CUDA when there is one; otherwise under ``TRITON_INTERPRET=1`` on the CPU (set here before the
kernels are imported, so plain ``pytest`` works too). The interpreter computes bf16 wrongly, so bf16 runs
on CUDA only.

Tolerances (absolute = relative), kernel vs reference:
- fp32: 2e-5. Both compute in fp32; only the summation order differs.
- fp16: decode 3e-3 (the reference rounds its fp16 score matmul to fp16, the kernel keeps fp32: ~1 fp16
  ulp of the output); prefill 5e-3 (the kernel also rounds P to fp16 before ``P @ V``, as flash-attention).
- bf16 (CUDA only): 2e-2 (8 mantissa bits).
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, DTYPES, context_lengths, paged_setup  # noqa: E402  (first: it sets TRITON_INTERPRET)

from flotilla.kernels.paged_attention import (  # noqa: E402
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    varlen_causal_attention_ref,
)
from flotilla.kernels.triton_paged_attention import (  # noqa: E402
    decode_num_splits,
    paged_decode_attention,
    paged_prefill_attention,
    varlen_causal_attention,
)

DECODE_TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
PREFILL_TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# (heads, kv_heads): GQA ratios 1, 4 and 8
GQA = [(4, 4), (8, 2), (8, 1)]


@pytest.mark.parametrize("heads, kv_heads", GQA)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_splits", [1, 3], ids=["no-split", "split-k"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_reference(heads, kv_heads, head_dim, block_size, num_splits, dtype):
    seq_lens = context_lengths(block_size)
    k_cache, v_cache, tables, _, _ = paged_setup(seq_lens, kv_heads, head_dim, block_size, dtype, seed=head_dim)
    q = torch.randn(len(seq_lens), heads, head_dim, device=DEVICE).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, num_splits=num_splits)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    tol = DECODE_TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("num_splits", [2, 5, 64])
def test_decode_split_k_merge_is_exact_for_any_split_count(num_splits):
    """Split counts that leave some splits empty for short sequences (lse = -inf must weigh nothing), and
    more splits than blocks (capped to one block each)."""
    heads, kv_heads, head_dim, block_size = 8, 2, 64, 16
    seq_lens = [1, 17, 9 * block_size + 3, 40]
    k_cache, v_cache, tables, _, _ = paged_setup(seq_lens, kv_heads, head_dim, block_size, torch.float32, 7)
    q = torch.randn(len(seq_lens), heads, head_dim, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125, num_splits=num_splits)
    unsplit = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125, num_splits=1)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, unsplit, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("head_dim", [80, 96])
def test_decode_handles_head_dims_that_are_not_powers_of_two(head_dim):
    seq_lens = context_lengths(16)
    k_cache, v_cache, tables, _, _ = paged_setup(seq_lens, 2, head_dim, 16, torch.float32, 3)
    q = torch.randn(len(seq_lens), 8, head_dim, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    for splits in (1, 2):
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5, num_splits=splits)
        ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_decode_split_heuristic_only_splits_long_contexts_on_idle_devices():
    cpu = torch.device("cpu")
    assert decode_num_splits(1, 8, 2048, 16, cpu) == 1  # nothing to fill on the interpreter
    if DEVICE == "cuda":
        dev = torch.device("cuda")
        assert decode_num_splits(1, 8, 2048, 16, dev) > 1  # one long sequence: split it
        assert decode_num_splits(1, 8, 8, 16, dev) == 1  # 128 tokens: too short to be worth it
        assert decode_num_splits(256, 8, 2048, 16, dev) == 1  # the batch fills the device already


@pytest.mark.parametrize("heads, kv_heads", GQA)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_over_paged_context_matches_reference(heads, kv_heads, head_dim, block_size, dtype):
    # (context incl. new tokens, new tokens): a fresh prompt, a chunk after cached blocks that starts
    # mid-block, a single token, a long fresh prompt spanning several query tiles, a long chunk after a
    # prefix-cache hit of exactly two blocks.
    spans = [(5, 5), (2 * block_size + 3, 7), (40, 1), (3 * block_size + 9, 3 * block_size + 9),
             (2 * block_size + 21, 21)]
    seq_lens = [n for n, _ in spans]
    k_cache, v_cache, tables, _, _ = paged_setup(seq_lens, kv_heads, head_dim, block_size, dtype, seed=1)
    qsl = [0]
    for _, q_len in spans:
        qsl.append(qsl[-1] + q_len)
    q = torch.randn(qsl[-1], heads, head_dim, device=DEVICE).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    starts = torch.tensor(qsl, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = paged_prefill_attention(q, k_cache, v_cache, tables, lens, starts, scale)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, tables, lens, starts, scale)
    tol = PREFILL_TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("heads, kv_heads", GQA)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fresh_varlen_prefill_matches_reference(heads, kv_heads, head_dim, dtype):
    lens = [3, 17, 1, 40, 16]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    g = torch.Generator().manual_seed(head_dim + heads)
    q = torch.randn(starts[-1], heads, head_dim, generator=g).to(dtype).to(DEVICE)
    # A non-contiguous key/value, as the model's split of the packed qkv projection produces.
    kv = torch.randn(starts[-1], 2 * kv_heads, head_dim, generator=g).to(dtype).to(DEVICE)
    k, v = kv[:, :kv_heads], kv[:, kv_heads:]
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    out = varlen_causal_attention(q, k, v, qsl, head_dim**-0.5)
    ref = varlen_causal_attention_ref(q, k, v, qsl, head_dim**-0.5)
    tol = PREFILL_TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_decode_and_prefill_agree_with_dense_attention_written_out():
    """Independent of the references: both kernels against softmax(q k^T) v in fp64, longhand."""
    heads, kv_heads, head_dim, block_size = 8, 2, 64, 16
    seq_lens = [1, 16, 37]
    k_cache, v_cache, tables, keys, values = paged_setup(seq_lens, kv_heads, head_dim, block_size,
                                                         torch.float32, 11)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(seq_lens), heads, head_dim, device=DEVICE)
    dec = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125, num_splits=2).cpu().double()
    starts = torch.tensor([0, 1, 5, 8], dtype=torch.int32, device=DEVICE)  # last 1, 4, 3 tokens are new
    qp = torch.randn(8, heads, head_dim, device=DEVICE)
    pre = paged_prefill_attention(qp, k_cache, v_cache, tables, lens, starts, 0.125).cpu().double()
    for i, n in enumerate(seq_lens):
        k = keys[i].double().repeat_interleave(heads // kv_heads, dim=1)  # [n, H, D]
        v = values[i].double().repeat_interleave(heads // kv_heads, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[i].cpu().double(), k) * 0.125, dim=-1)
        torch.testing.assert_close(dec[i], torch.einsum("hn,nhd->hd", w, v), atol=1e-5, rtol=1e-5)
        s, e = int(starts[i]), int(starts[i + 1])
        for j in range(e - s):
            pos = n - (e - s) + j
            w = torch.softmax(torch.einsum("hd,nhd->hn", qp[s + j].cpu().double(), k[: pos + 1]) * 0.125, -1)
            torch.testing.assert_close(pre[s + j], torch.einsum("hn,nhd->hd", w, v[: pos + 1]),
                                       atol=1e-5, rtol=1e-5)


# ---- sliding windows and logit soft-capping (Mistral, Gemma 2/3) ---------------------------------------------------

# (window, softcap): a window of one key, one inside a block, one spanning blocks and tiles, a soft cap alone, both.
# The scores (scale 1/8 on unit-variance q and k) have a standard deviation of about 1: a cap of 0.5 bites.
WINDOW_CAP = [(1, None), (5, None), (37, None), (None, 0.5), (21, 0.5)]


@pytest.mark.parametrize("window,softcap", WINDOW_CAP)
@pytest.mark.parametrize("num_splits", [1, 3], ids=["no-split", "split-k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_windowed_and_capped_decode_matches_reference(window, softcap, num_splits, dtype):
    seq_lens = context_lengths(16) + [130]
    k_cache, v_cache, tables, _, _ = paged_setup(seq_lens, 2, 64, 16, dtype, seed=5)
    q = torch.randn(len(seq_lens), 8, 64, generator=torch.Generator().manual_seed(6)).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    kw = dict(window=window, softcap=softcap)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125, num_splits=num_splits, **kw)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.125, **kw)
    tol = DECODE_TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("window,softcap", WINDOW_CAP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_windowed_and_capped_prefill_matches_reference(window, softcap, dtype):
    spans = [(5, 5), (2 * 16 + 3, 7), (40, 1), (3 * 16 + 9, 3 * 16 + 9), (2 * 16 + 21, 21)]
    seq_lens = [n for n, _ in spans]
    k_cache, v_cache, tables, _, _ = paged_setup(seq_lens, 2, 64, 16, dtype, seed=2)
    qsl = [0]
    for _, q_len in spans:
        qsl.append(qsl[-1] + q_len)
    q = torch.randn(qsl[-1], 8, 64, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    starts = torch.tensor(qsl, dtype=torch.int32, device=DEVICE)
    kw = dict(window=window, softcap=softcap)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, lens, starts, 0.125, **kw)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, tables, lens, starts, 0.125, **kw)
    tol = PREFILL_TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # fresh prompts: the same kernel on the step's own K/V
    fresh = [0, 3, 20, 21, 61]
    g = torch.Generator().manual_seed(9)
    qf = torch.randn(fresh[-1], 8, 64, generator=g).to(dtype).to(DEVICE)
    kv = torch.randn(fresh[-1], 4, 64, generator=g).to(dtype).to(DEVICE)
    qslf = torch.tensor(fresh, dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(varlen_causal_attention(qf, kv[:, :2], kv[:, 2:], qslf, 0.125, **kw).float(),
                               varlen_causal_attention_ref(qf, kv[:, :2], kv[:, 2:], qslf, 0.125, **kw).float(),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("window,softcap", [(7, None), (None, 2.0), (7, 2.0)])
def test_window_and_cap_references_agree_with_attention_written_out(window, softcap):
    """The references themselves, against the definition in fp64: query i sees keys j with i - window < j <= i,
    scores cap * tanh(score / cap)."""
    heads, kv_heads, head_dim = 4, 2, 32
    seq_lens = [1, 9, 30]
    k_cache, v_cache, tables, keys, values = paged_setup(seq_lens, kv_heads, head_dim, 16, torch.float32, 4,
                                                         device="cpu")
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=g)
    kw = dict(window=window, softcap=softcap)
    dec = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.5, **kw).double()
    starts = torch.tensor([0, 1, 6, 18], dtype=torch.int32)  # last 1, 5, 12 tokens are new
    qp = torch.randn(18, heads, head_dim, generator=g)
    pre = paged_prefill_attention_ref(qp, k_cache, v_cache, tables, lens, starts, 0.5, **kw).double()

    def longhand(query, k, v, pos):
        lo = 0 if window is None else max(0, pos - window + 1)
        s = torch.einsum("hd,nhd->hn", query.double(), k[lo:pos + 1]) * 0.5
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        return torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v[lo:pos + 1])

    for i, n in enumerate(seq_lens):
        k = keys[i].double().repeat_interleave(heads // kv_heads, dim=1)
        v = values[i].double().repeat_interleave(heads // kv_heads, dim=1)
        torch.testing.assert_close(dec[i], longhand(q[i], k, v, n - 1), atol=1e-5, rtol=1e-5)
        s, e = int(starts[i]), int(starts[i + 1])
        for j in range(e - s):
            torch.testing.assert_close(pre[s + j], longhand(qp[s + j], k, v, n - (e - s) + j), atol=1e-5, rtol=1e-5)


def test_a_window_narrower_than_the_query_tile_leaves_no_row_without_keys(monkeypatch):
    """With 32 queries a tile and 16 keys an iteration (the GPU's shape is 64 and 32), a one-key window leaves the
    tile's later rows nothing to see in its first key block: their running sums must stay empty, not NaN."""
    from flotilla.kernels import triton_paged_attention

    monkeypatch.setattr(triton_paged_attention, "PREFILL_LAUNCH_OVERRIDE",
                        dict(block_m=32, block_n=16, num_warps=4, num_stages=1))
    qsl = torch.tensor([0, 40], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(40, 4, 32, generator=g).to(DEVICE)
    kv = torch.randn(40, 4, 32, generator=g).to(DEVICE)
    for window in (1, 3):
        out = varlen_causal_attention(q, kv[:, :2], kv[:, 2:], qsl, 0.5, window=window)
        ref = varlen_causal_attention_ref(q, kv[:, :2], kv[:, 2:], qsl, 0.5, window=window)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


# Launch shapes (query tokens a program, keys an iteration): key steps narrower than, as wide as, and wider than a
# query tile, so the causal diagonal spans part of a step, one step, or several query tiles.
PREFILL_SHAPES = [(16, 16), (32, 16), (16, 64)]


@pytest.mark.parametrize("block_m,block_n", PREFILL_SHAPES, ids=[f"m{m}-n{n}" for m, n in PREFILL_SHAPES])
@pytest.mark.parametrize("window", [None, 5, 45], ids=["causal", "window5", "window45"])
def test_prefill_key_stretches_meet_exactly_for_any_launch_shape(block_m, block_n, window, monkeypatch):
    """The prefill key loop runs in stretches (a window's edge and the causal diagonal masked, the keys every query
    of the tile sees unmasked): for every launch shape, long prompts and chunks after a cached context give the
    reference's output, so no key is dropped or counted twice where the stretches meet."""
    from flotilla.kernels import triton_paged_attention

    monkeypatch.setattr(triton_paged_attention, "PREFILL_LAUNCH_OVERRIDE",
                        dict(block_m=block_m, block_n=block_n, num_warps=4, num_stages=1))
    # (context incl. new tokens, new tokens): a fresh prompt of several tiles; chunks after 46 and 47 cached tokens,
    # so that a tile's first query sits one before and on the end of a key step (the last key every query of
    # the tile sees, where the unmasked stretch must stop); one token after 100.
    spans = [(131, 131), (96, 50), (97, 50), (101, 1)]
    seq_lens = [n for n, _ in spans]
    k_cache, v_cache, tables, _, _ = paged_setup(seq_lens, 2, 32, 16, torch.float32, seed=12)
    qsl = [0]
    for _, q_len in spans:
        qsl.append(qsl[-1] + q_len)
    g = torch.Generator().manual_seed(13)
    q = torch.randn(qsl[-1], 4, 32, generator=g).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    starts = torch.tensor(qsl, dtype=torch.int32, device=DEVICE)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, lens, starts, 0.2, window=window)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, tables, lens, starts, 0.2, window=window)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    kv = torch.randn(qsl[-1], 4, 32, generator=g).to(DEVICE)
    torch.testing.assert_close(varlen_causal_attention(q, kv[:, :2], kv[:, 2:], starts, 0.2, window=window),
                               varlen_causal_attention_ref(q, kv[:, :2], kv[:, 2:], starts, 0.2, window=window),
                               atol=2e-5, rtol=2e-5)
