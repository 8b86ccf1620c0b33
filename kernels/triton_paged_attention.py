"""Paged attention in Triton: decode (flash-decoding with a log-sum-exp merge) and varlen causal prefill
over the paged cache. Same signatures and layouts as the torch references in
``flotilla.kernels.paged_attention``, which are their test oracle and the CPU path.

Numerics: softmax statistics, scores and accumulators are fp32. The matmuls take the storage dtype (fp16/bf16 on
tensor cores; fp32 operands stay IEEE fp32, no TF32) with fp32 accumulation, and the probabilities are rounded to
V's dtype before ``P @ V``, as flash-attention does; the tests' fp16 tolerances cover that rounding. (Decode once
cast its tiles to fp32 for fp32 products: on an H100 that held it to 11% of the copy bandwidth.)

Sliding windows and logit soft-capping (``window``, ``softcap``: see the references) are runtime arguments: a
windowed decode or prefill tile starts its key loop at the window's first key, so it reads only what it can see.

Under ``TRITON_INTERPRET=1`` these run on CPU tensors (slowly), which is how the CPU test suite checks them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Decode: a split should cover enough tokens that the merge is cheap relative to the split itself.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 64
# Decode launch shape on CUDA: tokens per loop iteration (several cache blocks, gathered through the block table, so
# that enough bytes are in flight to keep HBM busy), warps, and software-pipelining depth. Chosen by the sweep in
# benchmarks/kernels.py (--sweep) on an H100; the interpreter takes 32 tokens an iteration.
DECODE_TILE_N = 64
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2


@functools.lru_cache(maxsize=None)
def _device_programs_target(device: torch.device) -> int:
    """How many programs it takes to fill the device: two per SM on CUDA; 1 on the CPU interpreter,
    where there is nothing to fill and splitting only costs time."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, block_size: int,
                      device: torch.device) -> int:
    """Split-K factor for flash-decoding: split only when sequences × KV heads leave the device idle, and
    never below ``_MIN_TOKENS_PER_SPLIT`` tokens a split. Uses host-known shapes only (no sync on
    ``seq_lens``), so it is CUDA-graph safe."""
    programs = max(1, num_seqs * num_kv_heads)
    want = triton.cdiv(_device_programs_target(device), programs)
    cap = max(1, (max_blocks * block_size) // _MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, cap, _MAX_SPLITS))


@triton.jit
def _soft_cap(s, softcap):
    """``softcap * tanh(s / softcap)``, tanh written with exp (saturates to +-1 without overflow trouble)."""
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))


@triton.jit(do_not_specialize=["tiles_per_split", "window"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, lse_ptr, scale, window, softcap,
    stride_qs, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bt,
    stride_os, stride_oh, stride_osplit,
    stride_ls, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, tiles_per_split,
    SOFTCAP: tl.constexpr,
):
    """One program: one sequence × one KV head × one split of its tokens, TILE_N tokens an iteration (each token's
    cache block looked up in the block table, so a tile may span several blocks). It serves all GROUP query heads
    that share the KV head, so each K/V tile is read once for the whole group (GQA); the group is padded to
    BLOCK_G >= 16 rows so the score and PV products are ``tl.dot``s. IEEE: fp32 operands, fp32 products (fp32
    caches); otherwise the products take the cache's dtype on tensor cores, accumulating in fp32."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(lens_ptr + seq)
    first = split * tiles_per_split * TILE_N
    last = tl.minimum(first + tiles_per_split * TILE_N, seq_len)
    if window > 0:  # the query (at seq_len - 1) sees the last `window` keys only
        first = tl.maximum(first, seq_len - window)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, TILE_N)
    heads = kvh * GROUP + g
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM

    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    table = bt_ptr + seq * stride_bt
    for start in range(first, last, TILE_N):
        pos = start + n
        t_ok = pos < last  # the last tile may be partial
        phys = tl.load(table + pos // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
        within = pos % BLOCK_SIZE
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + (phys * stride_kb + within * stride_kt)[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + (phys * stride_vb + within * stride_vt)[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale  # [BLOCK_G, TILE_N]
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        if SOFTCAP:
            s = _soft_cap(s, softcap)
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    has = l > 0  # an empty split (past the sequence's end) has l = 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    o_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + split * stride_osplit + d[None, :]
    o_mask = g_ok[:, None] & d_ok[None, :]
    if SPLIT:
        tl.store(o_ptrs, out, mask=o_mask)
        lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=g_ok)
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _merge_splits_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits,
    stride_ps, stride_ph, stride_psplit,
    stride_ls, stride_lh,
    stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    """Combine a head's per-split normalised outputs: out = sum_i exp(lse_i - M) o_i / sum_i exp(lse_i - M),
    with M the largest lse, so no split's exponent overflows and empty splits (lse = -inf) weigh 0."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    sp_ok = sp < num_splits
    lse = tl.load(lse_ptr + seq * stride_ls + head * stride_lh + sp, mask=sp_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # a zero-length sequence: every weight is 0, output 0
    w = tl.exp(lse - top)
    part = tl.load(part_ptr + seq * stride_ps + head * stride_ph + sp[:, None] * stride_psplit + d[None, :],
                   mask=sp_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")
    if k_cache.shape[2] & (k_cache.shape[2] - 1):
        raise ValueError(f"block_size must be a power of two, got {k_cache.shape[2]}")


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    tile_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Triton twin of ``paged_decode_attention_ref``. ``num_splits`` forces the split-K factor (tests);
    by default ``decode_num_splits`` picks it from the shapes. ``tile_n``/``num_warps``/``num_stages`` override the
    launch shape (benchmarks/kernels.py --sweep)."""
    num_seqs, num_heads, head_dim = query.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    _check_cache(k_cache, v_cache)
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    query = query if query.stride(-1) == 1 else query.contiguous()
    cuda = query.device.type == "cuda"
    tile_n = tile_n or (DECODE_TILE_N if cuda else 32)  # 32: tiles span blocks in the CPU tests too
    max_blocks = block_tables.shape[1]
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_blocks, block_size, query.device)
    max_tiles = triton.cdiv(max_blocks * block_size, tile_n)
    tiles_per_split = triton.cdiv(max_tiles, max(1, num_splits))
    num_splits = triton.cdiv(max_tiles, tiles_per_split)  # no split that starts past every table's end
    block_g = max(16, triton.next_power_of_2(group))
    block_d = triton.next_power_of_2(head_dim)
    split = num_splits > 1
    if split:
        part = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
        target, t_strides, l_strides = part, part.stride()[:3], lse.stride()[:2]
    else:
        lse = out  # unused when not splitting
        target, t_strides, l_strides = out, (*out.stride()[:2], 0), (0, 0)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens, target, lse, scale, window or 0, softcap or 0.0,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *t_strides, *l_strides,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_SIZE=block_size, TILE_N=tile_n,
        SPLIT=split, IEEE=k_cache.dtype == torch.float32,
        tiles_per_split=tiles_per_split,  # a runtime value: no recompile per batch shape
        SOFTCAP=softcap is not None,
        num_warps=num_warps or (DECODE_NUM_WARPS if cuda else 4),
        num_stages=num_stages or (DECODE_NUM_STAGES if cuda else 1),
    )
    if split:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part, lse, out, num_splits,
            *part.stride()[:3], *lse.stride()[:2], *out.stride()[:2],
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SPLITS=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out


# ---- prefill ------------------------------------------------------------------------------------------

@triton.jit
def _prefill_keys(q, m, l, acc, start, k_ptr, v_ptr, bt_ptr, seq, q_start, kvh, q_pos, kv_end, scale, window, softcap,
                  d, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_bt,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  PAGED: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                  MASKED: tl.constexpr):
    """One iteration of the key loop: BLOCK_N keys from ``start`` folded into the tile's running max ``m`` (log2
    units), sum ``l`` and output ``acc``. MASKED tiles may hold keys past ``kv_end`` or that some of the tile's
    queries may not see (the causal diagonal, a window's edge); an unmasked tile is one every query sees whole, so
    it skips the mask arithmetic, which is most of the work of a long prompt."""
    pos = start + tl.arange(0, BLOCK_N)
    n_ok = pos < kv_end
    if PAGED:
        # BLOCK_N may span several cache blocks: look up each key's block.
        if MASKED:
            phys = tl.load(bt_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        else:
            phys = tl.load(bt_ptr + seq * stride_bt + pos // BLOCK_SIZE).to(tl.int64)
        k_off = phys * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kvh * stride_kh
        v_off = phys * stride_vb + (pos % BLOCK_SIZE) * stride_vt + kvh * stride_vh
    else:
        k_off = (q_start + pos).to(tl.int64) * stride_kt + kvh * stride_kh
        v_off = (q_start + pos).to(tl.int64) * stride_vt + kvh * stride_vh
    kv_mask = d[None, :] < HEAD_DIM
    if MASKED:
        kv_mask = kv_mask & n_ok[:, None]
    if MASKED or HEAD_DIM != BLOCK_D:
        k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_ptr + k_off[:, None] + d[None, :])
    # Scores in log2 units, for exp2 (the GPU's native exponential): exp(x) = exp2(x * log2(e)).
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if SOFTCAP:
        s = _soft_cap(s * scale, softcap) * 1.4426950408889634
    else:
        s = s * (scale * 1.4426950408889634)
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & n_ok[None, :]
        if WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row may see none of this tile's keys yet (a window narrower than the query tile): keep its sums at 0
        # rather than exp2(-inf - -inf).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m - m_use)  # 0 while m is -inf
    l = l * alpha + tl.sum(p, axis=1)
    if MASKED or HEAD_DIM != BLOCK_D:
        v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    else:
        v = tl.load(v_ptr + v_off[:, None] + d[None, :])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit(do_not_specialize=["num_seqs", "window"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, lens_ptr, qsl_ptr, scale, num_seqs, window, softcap,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
):
    """One program: BLOCK_M consecutive new tokens of one sequence × one query head.

    Tiles are laid out without a host sync: sequence i owns tiles from ``qsl[i] // BLOCK_M + i``, an upper
    bound on the tiles of the sequences before it, so a binary search over ``query_start_loc`` finds a
    program's sequence and surplus programs exit. A sequence's programs take its tiles last first: under the
    causal mask later tiles see more keys, so the long programs start early and the grid ends on short ones.
    PAGED reads K/V through the block table (context already cached); otherwise K/V are the new tokens' own
    ``[num_tokens, kv_heads, head_dim]`` tensors.

    The key loop runs in three stretches: keys that only some queries see (a window's trailing edge), keys every
    query of the tile sees (no mask), and the causal diagonal (keys past the tile's first query)."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // GROUP

    lo: tl.int32 = 0
    hi = num_seqs  # count the i with qsl[i] // BLOCK_M + i <= pid; the last of them is this program's
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_M + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    num_tiles = tl.cdiv(q_len, BLOCK_M)
    tile = num_tiles - 1 - (pid - (q_start // BLOCK_M + seq))  # last tile first; negative: a surplus program
    if tile >= 0:
        if PAGED:
            seq_len = tl.load(lens_ptr + seq)
        else:
            seq_len = q_len
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        q_pos = seq_len - q_len + rows  # absolute position of each query token
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q = q.to(k_ptr.dtype.element_ty)  # the matmuls take the storage dtype (see the module docstring)

        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        first_q = seq_len - q_len + tile * BLOCK_M
        kv_end = seq_len - q_len + tl.minimum((tile + 1) * BLOCK_M, q_len)  # causal: past the last query's own key
        edge_end = 0  # every query of the tile sees the keys from here up to its first query's own...
        if WINDOW:  # ...but a window hides the first ones from the tile's later queries: mask those
            kv_start = tl.maximum(first_q - window + 1, 0)
            full_lo = tl.maximum(kv_end - window, 0)
            # [kv_start, edge_end): the window's edge; whole BLOCK_N steps from kv_start, so the stretches meet.
            edge_end = tl.minimum(kv_start + tl.cdiv(full_lo - kv_start, BLOCK_N) * BLOCK_N, kv_end)
            for start in range(kv_start, edge_end, BLOCK_N):
                m, l, acc = _prefill_keys(q, m, l, acc, start, k_ptr, v_ptr, bt_ptr, seq, q_start, kvh, q_pos, kv_end,
                                          scale, window, softcap, d, stride_kb, stride_kh, stride_kt, stride_vb,
                                          stride_vh, stride_vt, stride_bt, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE,
                                          PAGED, DOT_PRECISION, SOFTCAP, WINDOW, True)
        # [edge_end, diag_start): keys at or before the first query's position, seen by all, unmasked.
        diag_start = edge_end + tl.maximum(first_q + 1 - edge_end, 0) // BLOCK_N * BLOCK_N
        for start in range(edge_end, diag_start, BLOCK_N):
            m, l, acc = _prefill_keys(q, m, l, acc, start, k_ptr, v_ptr, bt_ptr, seq, q_start, kvh, q_pos, kv_end,
                                      scale, window, softcap, d, stride_kb, stride_kh, stride_kt, stride_vb,
                                      stride_vh, stride_vt, stride_bt, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, PAGED,
                                      DOT_PRECISION, SOFTCAP, WINDOW, False)
        for start in range(diag_start, kv_end, BLOCK_N):
            m, l, acc = _prefill_keys(q, m, l, acc, start, k_ptr, v_ptr, bt_ptr, seq, q_start, kvh, q_pos, kv_end,
                                      scale, window, softcap, d, stride_kb, stride_kh, stride_kt, stride_vb,
                                      stride_vh, stride_vt, stride_bt, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, PAGED,
                                      DOT_PRECISION, SOFTCAP, WINDOW, True)
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# Prefill launch shape on CUDA (query tokens a program, keys an iteration, warps, pipelining depth): chosen by the
# sweep in benchmarks/kernels.py (--sweep) on an H100, for the kernel as it was before its key loop was split into
# stretches (`benchmarks/gpu_session.sh prefill` sweeps again). ``PREFILL_LAUNCH_OVERRIDE`` replaces it (that sweep;
# tests).
PREFILL_LAUNCH = dict(block_m=64, block_n=32, num_warps=4, num_stages=3)
# Heads wider than 128 (Gemma's 256): 8 warps share the tile's fp32 accumulator, which 4 warps hold only by spilling
# registers (benchmarks/kernels_compile.py for sm_90: 255 registers and a spill at 4 warps, 219 and none at 8).
PREFILL_LAUNCH_WIDE_HEADS = dict(block_m=64, block_n=32, num_warps=8, num_stages=3)
PREFILL_LAUNCH_OVERRIDE: dict | None = None


def cuda_prefill_launch(head_dim: int) -> dict:
    return PREFILL_LAUNCH if head_dim <= 128 else PREFILL_LAUNCH_WIDE_HEADS


def _prefill_launch(query, key_src, value_src, block_tables, seq_lens, query_start_loc, scale, block_size,
                    paged: bool, key_strides, value_strides, window: int | None,
                    softcap: float | None) -> torch.Tensor:
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_src.shape[1]
    out = torch.empty_like(query)
    num_seqs = query_start_loc.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    query = query if query.stride(-1) == 1 else query.contiguous()
    if PREFILL_LAUNCH_OVERRIDE is not None:
        launch = PREFILL_LAUNCH_OVERRIDE
    elif query.device.type == "cuda":
        launch = cuda_prefill_launch(head_dim)
    else:
        launch = dict(block_m=16, block_n=max(16, min(64, block_size)), num_warps=4, num_stages=1)
    block_m = launch["block_m"]
    _prefill_kernel[(num_tokens // block_m + num_seqs, num_heads)](
        query, key_src, value_src, out, block_tables, seq_lens, query_start_loc, scale, num_seqs, window or 0,
        softcap or 0.0, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        *key_strides, *value_strides, block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m, BLOCK_N=launch["block_n"], BLOCK_SIZE=block_size, PAGED=paged,
        # fp32 operands stay IEEE fp32 (no TF32); fp16/bf16 ignore this and use tensor cores.
        DOT_PRECISION="ieee" if key_src.dtype == torch.float32 else "tf32", SOFTCAP=softcap is not None,
        WINDOW=bool(window), num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )
    return out


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Triton twin of ``paged_prefill_attention_ref``: new-token spans attend causally to their whole
    paged context (prefix-cache hits, earlier chunks, and themselves, already written)."""
    _check_cache(k_cache, v_cache)
    return _prefill_launch(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                           k_cache.shape[2], True, k_cache.stride()[:3], v_cache.stride()[:3], window, softcap)


def varlen_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Triton twin of ``varlen_causal_attention_ref``: prompts with no cached context attend to their own
    new K/V ``[num_tokens, kv_heads, head_dim]``; nothing is read from the paged cache."""
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    # The block table and block size are unused when not PAGED; pass placeholders of the right kinds.
    return _prefill_launch(query, key, value, query_start_loc, query_start_loc, query_start_loc, scale, 16,
                           False, (0, key.stride(1), key.stride(0)), (0, value.stride(1), value.stride(0)), window,
                           softcap)


__all__ = [
    "decode_num_splits",
    "paged_decode_attention",
    "paged_prefill_attention",
    "varlen_causal_attention",
]
