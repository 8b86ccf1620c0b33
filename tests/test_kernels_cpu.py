"""The compiled CPU kernels (``flotilla.kernels.cpu_ops``, C++ built by ``cpu_build``) against the torch
references and a longhand fp64 softmax, over random unordered block tables with garbage in every block a
sequence does not own: GQA ratios 1/3/4/8, head_dim 64/80/128 (80: the portable loops; 64/128: the AVX-512
path where the CPU has it), block sizes 16/32, ragged contexts (one token, partial blocks, exact blocks, several
blocks), prefill spans after cached context, fp32/fp16/bf16. Then the elementwise kernels against theirs.

Tolerances, kernel vs oracle: fp32 2e-5 (fp32 both ways, only the summation order differs). For fp16/bf16
the oracle is the reference run in fp32 on the same (already rounded) inputs: the kernel widens its inputs
and accumulates in fp32 too, so the one rounding left is its output's (fp16 2e-3, bf16 1.6e-2: ~2 ulp).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernel_cases import context_lengths, paged_setup

from flotilla.engine.attention import load_cpu_kernels
from flotilla.engine.layers.rotary import RotaryEmbedding
from flotilla.kernels import cpu_build, cpu_ops, elementwise
from flotilla.kernels.elementwise import ELEMENTWISE_ENV, rms_norm_ref, rotary_embedding_ref, silu_and_mul_ref
from flotilla.kernels.paged_attention import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    write_kv_cache_ref,
)

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in TOL]
GQA = [(4, 4), (9, 3), (8, 2), (8, 1)]  # (heads, kv_heads): ratios 1, 3 (SmolLM2), 4, 8


@pytest.fixture(scope="module", autouse=True)
def library():
    return load_cpu_kernels()


def _oracle(fn, *tensors_then_rest, dtype):
    """The reference in fp32 on the same inputs, cast to the kernel's dtype."""
    args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in tensors_then_rest]
    return fn(*args).to(dtype)


def _close(out, expected, dtype):
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("heads, kv_heads", GQA)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_reference(heads, kv_heads, head_dim, block_size, dtype):
    seq_lens = context_lengths(block_size) + [9 * block_size + 3]
    k_cache, v_cache, tables, _, _ = paged_setup(seq_lens, kv_heads, head_dim, block_size, dtype, head_dim,
                                                 device="cpu")
    q = torch.randn(len(seq_lens), heads, head_dim).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = head_dim**-0.5
    out = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    _close(out, _oracle(paged_decode_attention_ref, q, k_cache, v_cache, tables, lens, scale, dtype=dtype), dtype)


@pytest.mark.parametrize("heads, kv_heads", GQA)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_over_paged_context_matches_reference(heads, kv_heads, block_size, dtype):
    # (context incl. new tokens, new tokens): a fresh prompt, a chunk starting mid-block after cached blocks,
    # one token, a long fresh prompt over several query tiles, a long chunk after a two-block prefix hit, and a
    # chunk from position 61 whose first query tile straddles key 64 (where the vector path's 64-key spans meet:
    # its rows before 64 see nothing of the second span).
    spans = [(5, 5), (2 * block_size + 3, 7), (40, 1), (3 * block_size + 9, 3 * block_size + 9),
             (2 * block_size + 21, 21), (80, 19)]
    k_cache, v_cache, tables, _, _ = paged_setup([n for n, _ in spans], kv_heads, 64, block_size, dtype, 1,
                                                 device="cpu")
    starts = [0]
    for _, q_len in spans:
        starts.append(starts[-1] + q_len)
    q = torch.randn(starts[-1], heads, 64).to(dtype)
    lens = torch.tensor([n for n, _ in spans], dtype=torch.int32)
    qsl = torch.tensor(starts, dtype=torch.int32)
    out = cpu_ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 0.125)
    expected = _oracle(paged_prefill_attention_ref, q, k_cache, v_cache, tables, lens, qsl, 0.125, dtype=dtype)
    _close(out, expected, dtype)


def test_decode_and_prefill_agree_with_dense_attention_written_out():
    """Independent of the references: softmax(q k^T) v in fp64, longhand, per query position."""
    heads, kv_heads, head_dim, block_size = 8, 2, 64, 16
    seq_lens = [1, 16, 37]
    k_cache, v_cache, tables, keys, values = paged_setup(seq_lens, kv_heads, head_dim, block_size, torch.float32,
                                                         11, device="cpu")
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(len(seq_lens), heads, head_dim)
    dec = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125).double()
    starts = torch.tensor([0, 1, 5, 8], dtype=torch.int32)  # the last 1, 4, 3 tokens are new
    qp = torch.randn(8, heads, head_dim)
    pre = cpu_ops.paged_attention(qp, k_cache, v_cache, tables, lens, starts, 0.125).double()
    for i, n in enumerate(seq_lens):
        k = keys[i].double().repeat_interleave(heads // kv_heads, dim=1)  # [n, H, D]
        v = values[i].double().repeat_interleave(heads // kv_heads, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), k) * 0.125, dim=-1)
        torch.testing.assert_close(dec[i], torch.einsum("hn,nhd->hd", w, v), atol=1e-5, rtol=1e-5)
        s, e = int(starts[i]), int(starts[i + 1])
        for j in range(e - s):
            pos = n - (e - s) + j
            w = torch.softmax(torch.einsum("hd,nhd->hn", qp[s + j].double(), k[: pos + 1]) * 0.125, -1)
            torch.testing.assert_close(pre[s + j], torch.einsum("hn,nhd->hd", w, v[: pos + 1]), atol=1e-5, rtol=1e-5)


def test_decode_reads_strided_queries_as_the_model_passes_them():
    """The model hands attention a view of its packed qkv projection: rows are not contiguous."""
    k_cache, v_cache, tables, _, _ = paged_setup([20, 3], 2, 64, 16, torch.float32, 5, device="cpu")
    qkv = torch.randn(2, 12, 64)
    q = qkv[:, :8]
    lens = torch.tensor([20, 3], dtype=torch.int32)
    out = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.125),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_nan_past_a_context_in_its_own_last_block_never_leaks(dtype, head_dim):
    """The vector path scores whole runs of 16 keys and masks the ones past a row's position: whatever those
    slots hold (here NaN, as freed blocks may) must not reach the output, in decode or in a prefill tile."""
    seq_lens = [5, 16 + 9, 3]
    k_cache, v_cache, tables, _, _ = paged_setup(seq_lens, 2, head_dim, 16, dtype, 2, device="cpu")
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(len(seq_lens), 6, head_dim).to(dtype)
    starts = torch.tensor([0, 5, 5 + 12, 5 + 12 + 3], dtype=torch.int32)  # whole prompts, a chunk, whole
    qp = torch.randn(20, 6, head_dim).to(dtype)
    # The oracles on the clean cache (the torch reference itself multiplies whole blocks by their weights).
    expected_decode = _oracle(paged_decode_attention_ref, q, k_cache, v_cache, tables, lens, 0.1, dtype=dtype)
    expected_prefill = _oracle(paged_prefill_attention_ref, qp, k_cache, v_cache, tables, lens, starts, 0.1,
                               dtype=dtype)
    for row, n in zip(tables.tolist(), seq_lens):
        last = row[(n - 1) // 16]
        k_cache[last, :, n % 16:] = float("nan")
        v_cache[last, :, n % 16:] = float("nan")
    _close(cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1), expected_decode, dtype)
    _close(cpu_ops.paged_attention(qp, k_cache, v_cache, tables, lens, starts, 0.1), expected_prefill, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_matches_reference_and_skips_padding_slots(dtype):
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randn(6, 2, 16, 64, generator=g).to(dtype)
    v_cache = torch.randn(6, 2, 16, 64, generator=g).to(dtype)
    kv = torch.randn(5, 4, 64, generator=g)  # fp32 in, as a model in fp32 autocast could hand it: converted
    key, value = kv[:, :2], kv[:, 2:]  # non-contiguous, as split from the qkv projection
    slots = torch.tensor([17, -1, 0, 95, 40])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(key, value, expected_k, expected_v, slots)
    cpu_ops.write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_write_kv_refuses_a_slot_outside_the_cache():
    k_cache, v_cache = torch.zeros(2, 1, 16, 8), torch.zeros(2, 1, 16, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_ops.write_kv_cache(torch.ones(1, 1, 8), torch.ones(1, 1, 8), k_cache, v_cache, torch.tensor([32]))
    assert not k_cache.any()


@pytest.mark.parametrize("flags, level", [
    ("fpu sse4_1 sse4_2 ssse3 popcnt cx16", "x86-64-v2"),
    ("sse4_1 sse4_2 ssse3 popcnt cx16 avx avx2 bmi1 bmi2 f16c fma movbe xsave", "x86-64-v3"),
    ("sse4_1 sse4_2 ssse3 popcnt cx16 avx avx2 bmi1 bmi2 f16c fma movbe xsave avx512f avx512bw avx512cd avx512dq "
     "avx512vl avx512_bf16", "x86-64-v4"),
    ("avx512f avx512bw avx512cd avx512dq avx512vl", "x86-64"),  # AVX-512 flags without the v2/v3 ones: no level
])
def test_isa_level_is_the_highest_level_whose_flags_are_all_present(flags, level):
    assert cpu_build.isa_level(set(flags.split()), "x86_64") == level


def test_library_names_differ_by_level_and_the_built_one_is_found(library):
    assert cpu_build.library_name("x86-64-v3") != cpu_build.library_name("x86-64-v4")
    assert cpu_build.find([library.parent]) == library


def _select_backend_in_subprocess(tmp_path, **env) -> subprocess.CompletedProcess:
    code = ("import torch; from flotilla.engine.attention import select_backend; "
            "print('backend', select_backend(torch.device('cpu')).name)")
    full = {**os.environ, "FLOTILLA_CACHE": str(tmp_path / "cache"), "FLOTILLA_CACHE_PREBUILT": "", **env}
    full.pop("FLOTILLA_ATTENTION_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=600)


def test_without_a_compiler_the_engine_warns_once_and_uses_the_torch_path(tmp_path):
    proc = _select_backend_in_subprocess(tmp_path, CXX="", PATH=str(Path(sys.executable).parent))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["backend", "torch"]
    warnings = [ln for ln in proc.stderr.splitlines() if "CPU attention kernels unavailable" in ln]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0], proc.stderr


def test_a_failing_compiler_is_one_line_and_the_torch_path(tmp_path):
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'x.cpp:1:1: error: something is wrong' >&2\nexit 1\n")
    broken.chmod(0o755)
    proc = _select_backend_in_subprocess(tmp_path, CXX=str(broken))
    assert proc.stdout.split() == ["backend", "torch"], proc.stderr
    assert "cxx failed: x.cpp:1:1: error: something is wrong" in proc.stderr
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # nothing half-built is left to be loaded


# ---- elementwise --------------------------------------------------------------------------------------
# The kernels round every intermediate the references store in the model's dtype, so what is left is the norm's
# summation order and silu's exp (fp32: ~1 ulp; fp16/bf16: a result on a rounding boundary may land one ulp off).
EW_TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _ew_close(out, expected, dtype):
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected.float(), atol=EW_TOL[dtype], rtol=EW_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 1000])
def test_rms_norm_with_and_without_residual_matches_reference(dtype, hidden):
    g = torch.Generator().manual_seed(hidden)
    x = (3 * torch.randn(2, 9, hidden, generator=g)).to(dtype)
    residual = torch.randn(2, 9, hidden, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    _ew_close(cpu_ops.rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6), dtype)
    out, summed = cpu_ops.rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_summed = rms_norm_ref(x, weight, 1e-5, residual)
    _ew_close(out, ref_out, dtype)
    assert torch.equal(summed, ref_summed)  # one correctly rounded add in both


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_embedding_in_place_equals_reference(dtype, head_dim):
    """Each product and sum rounded as the reference rounds it, no fused multiply-add: equal, bit for bit."""
    rope = RotaryEmbedding(head_dim, 300, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    heads, kv_heads, tokens = 9, 3, 11
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)  # views of the packed projection, as the model has
    k = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    positions = torch.tensor([0, 1, 2, 15, 31, 64, 65, 100, 200, 298, 299])
    ref_q, ref_k = rotary_embedding_ref(positions, q.clone(), k.clone(), rope.cos, rope.sin)
    out_q, out_k = cpu_ops.rotary_embedding(positions, q, k, rope.cos, rope.sin)
    assert out_q.data_ptr() == q.data_ptr() and torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v untouched
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        cpu_ops.rotary_embedding(torch.tensor([300] * tokens), q, k, rope.cos, rope.sin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [128, 1000])
def test_silu_and_mul_matches_reference(dtype, inter):
    x = (3 * torch.randn(2, 5, 2 * inter, generator=torch.Generator().manual_seed(inter))).to(dtype)
    x[0, 0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamps, silu(0)
    _ew_close(cpu_ops.silu_and_mul(x), silu_and_mul_ref(x), dtype)


def test_elementwise_dispatch_takes_the_compiled_kernels_only_where_asked(monkeypatch):
    monkeypatch.delenv(ELEMENTWISE_ENV, raising=False)
    x, w = torch.randn(3, 64), torch.ones(64)
    calls = []
    monkeypatch.setattr(cpu_ops, "rms_norm", lambda *a: calls.append("cpu") or rms_norm_ref(*a))
    elementwise.rms_norm(x, w, 1e-6)
    assert calls == []  # outside a compiled-kernels scope: the reference
    with elementwise.compiled_cpu_kernels():
        elementwise.rms_norm(x, w, 1e-6)
        monkeypatch.setenv(ELEMENTWISE_ENV, "torch")
        elementwise.rms_norm(x, w, 1e-6)  # the override wins
    assert calls == ["cpu"]
    monkeypatch.setenv(ELEMENTWISE_ENV, "cpu")
    elementwise.rms_norm(x, w, 1e-6)
    assert calls == ["cpu", "cpu"]
