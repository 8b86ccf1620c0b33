"""Kernel benchmarks on a CUDA GPU: how close the Triton attention kernels get to the hardware and to torch.

- Decode (paged, flash-decoding): achieved bandwidth — bytes of K/V actually attended plus Q and the output,
  per second — for batch × context, as a fraction of the device's copy bandwidth measured in the same run
  (``dst.copy_(src)`` of a large buffer, read + write bytes). Target: >= 0.8 at large batch × context.
- Prefill (causal, varlen): TFLOP/s of the Triton kernels (fresh prompts, and the paged kernel reading the
  same K/V through a block table) against ``torch.nn.functional.scaled_dot_product_attention`` on the same
  shapes (contiguous, causal), as a ratio. Target: >= 0.8x SDPA.

    python benchmarks/kernels.py                                  # defaults: Llama-3-8B attention shapes, fp16
    python benchmarks/kernels.py --batches 1,64 --contexts 512,8192 --json out.json

Timing is ``triton.testing.do_bench`` (median, L2 flushed between runs). Shapes whose K/V would exceed
``--max-kv-gib`` are skipped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batches", default="1,8,32,64,128,256")
    p.add_argument("--contexts", default="512,2048,8192,32768")
    p.add_argument("--prefill-batches", default="1,4")
    p.add_argument("--prefill-lens", default="512,1024,2048,4096,8192")
    p.add_argument("--max-kv-gib", type=float, default=None,
                   help="skip decode shapes whose K/V exceed this (default: 40%% of device memory)")
    p.add_argument("--only", choices=("decode", "prefill"), default=None,
                   help="measure (or sweep) one kernel only")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--sweep", action="store_true",
                   help="time the kernels' launch shapes (tile, warps, pipelining) on a few shapes and print the best "
                        "(how the defaults in flotilla/kernels/triton_paged_attention.py were chosen)")
    return p.parse_args(argv)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy of a 1 GiB buffer (1 GiB read + 1 GiB written): the roofline
    decode attention is compared with, measured on this device in this run."""
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3)


def bench_decode(args: argparse.Namespace, dtype: torch.dtype, device: torch.device, copy_bw: float) -> list[dict]:
    from flotilla.kernels.triton_paged_attention import decode_num_splits, paged_decode_attention

    bs, kvh, hd, h = args.block_size, args.kv_heads, args.head_dim, args.heads
    elem = torch.empty((), dtype=dtype).element_size()
    max_kv = (args.max_kv_gib * 2**30 if args.max_kv_gib is not None
              else 0.4 * torch.cuda.get_device_properties(device).total_memory)
    rows = []
    for batch in _ints(args.batches):
        for ctx in _ints(args.contexts):
            kv_bytes = 2 * batch * ctx * kvh * hd * elem
            row = dict(kind="decode", batch=batch, context=ctx)
            if kv_bytes > max_kv:
                rows.append({**row, "skipped": f"K/V {kv_bytes / 2**30:.1f} GiB > {max_kv / 2**30:.1f} GiB"})
                continue
            blocks_per_seq = math.ceil(ctx / bs)
            num_blocks = batch * blocks_per_seq
            k_cache = torch.randn(num_blocks, kvh, bs, hd, dtype=dtype, device=device)
            v_cache = torch.randn_like(k_cache)
            # Scattered blocks, as a long-running server's pool is.
            tables = torch.randperm(num_blocks, device=device, dtype=torch.int64).to(torch.int32)
            tables = tables.view(batch, blocks_per_seq)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
            q = torch.randn(batch, h, hd, dtype=dtype, device=device)
            ms = bench_ms(lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, hd**-0.5))
            moved = kv_bytes + 2 * q.numel() * elem + tables.numel() * 4
            bw = moved / (ms * 1e-3)
            rows.append({**row, "ms": ms, "GB/s": bw / 1e9, "fraction_of_copy_bw": bw / copy_bw,
                         "num_splits": decode_num_splits(batch, kvh, blocks_per_seq, bs, device)})
            del k_cache, v_cache
            torch.cuda.empty_cache()
    return rows


def bench_prefill(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> list[dict]:
    import torch.nn.functional as F

    from flotilla.kernels.triton_paged_attention import paged_prefill_attention, varlen_causal_attention

    bs, kvh, hd, h = args.block_size, args.kv_heads, args.head_dim, args.heads
    rows = []
    for batch in _ints(args.prefill_batches):
        for n in _ints(args.prefill_lens):
            tokens = batch * n
            q = torch.randn(tokens, h, hd, dtype=dtype, device=device)
            k = torch.randn(tokens, kvh, hd, dtype=dtype, device=device)
            v = torch.randn_like(k)
            qsl = torch.arange(0, tokens + 1, n, dtype=torch.int32, device=device)
            scale = hd**-0.5
            # The same K/V in a paged cache, sequence i in blocks [i * n / bs, ...).
            blocks = tokens // bs
            k_cache = k.view(blocks, bs, kvh, hd).transpose(1, 2).contiguous()
            v_cache = v.view(blocks, bs, kvh, hd).transpose(1, 2).contiguous()
            tables = torch.arange(blocks, dtype=torch.int32, device=device).view(batch, n // bs)
            lens = torch.full((batch,), n, dtype=torch.int32, device=device)
            # SDPA on contiguous [B, H, L, D], K/V expanded to every query head outside the timing.
            qd = q.view(batch, n, h, hd).transpose(1, 2).contiguous()
            kd = k.view(batch, n, kvh, hd).transpose(1, 2).repeat_interleave(h // kvh, dim=1).contiguous()
            vd = v.view(batch, n, kvh, hd).transpose(1, 2).repeat_interleave(h // kvh, dim=1).contiguous()
            flops = 4 * batch * h * hd * n * (n + 1) / 2  # causal: QK^T and PV over the lower triangle
            t_fresh = bench_ms(lambda: varlen_causal_attention(q, k, v, qsl, scale))
            t_paged = bench_ms(lambda: paged_prefill_attention(q, k_cache, v_cache, tables, lens, qsl, scale))
            t_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale))
            tf = lambda ms: flops / (ms * 1e-3) / 1e12  # noqa: E731
            rows.append(dict(kind="prefill", batch=batch, seq_len=n, fresh_TFLOPs=tf(t_fresh),
                             paged_TFLOPs=tf(t_paged), sdpa_TFLOPs=tf(t_sdpa),
                             fresh_vs_sdpa=t_sdpa / t_fresh, paged_vs_sdpa=t_sdpa / t_paged))
    return rows


def sweep(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> dict:
    """Milliseconds of each launch shape on representative shapes; the best by geometric mean over the shapes."""
    results: dict = {}
    shapes: dict = {}
    if args.only != "prefill":
        shapes["decode"], results["decode"] = _sweep_decode(args, dtype, device)
        torch.cuda.empty_cache()
    if args.only != "decode":
        shapes["prefill"], results["prefill"] = _sweep_prefill(args, dtype, device)
    from flotilla.kernels import triton_paged_attention as tpa

    for kind in results:
        ranked = sorted(results[kind].items(), key=lambda kv: math.prod(kv[1]) ** (1 / len(kv[1])))
        print(f"\n{kind} sweep, ms at shapes {shapes[kind]}; best five, then the default")
        default = (f"tile{tpa.DECODE_TILE_N}-w{tpa.DECODE_NUM_WARPS}-s{tpa.DECODE_NUM_STAGES}" if kind == "decode" else
                   "m{block_m}-n{block_n}-w{num_warps}-s{num_stages}".format(**tpa.PREFILL_LAUNCH))
        for name, times in ranked[:5] + [(default + " (default)", results[kind].get(default, []))]:
            print(f"  {name:>28}: " + " ".join(f"{t:8.3f}" for t in times))
    return results


def _sweep_decode(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> tuple[list, dict]:
    import itertools

    from flotilla.kernels import triton_paged_attention as tpa

    bs, kvh, hd, h = args.block_size, args.kv_heads, args.head_dim, args.heads
    shapes = [(256, 512), (256, 2048), (64, 2048), (32, 8192), (1, 32768), (8, 2048)]
    inputs = []
    for batch, ctx in shapes:
        blocks = batch * (ctx // bs)
        k_cache = torch.randn(blocks, kvh, bs, hd, dtype=dtype, device=device)
        tables = torch.randperm(blocks, device=device).to(torch.int32).view(batch, ctx // bs)
        inputs.append((k_cache, torch.randn_like(k_cache), tables,
                       torch.full((batch,), ctx, dtype=torch.int32, device=device),
                       torch.randn(batch, h, hd, dtype=dtype, device=device)))
    results = {}
    for tile, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4)):
        times = []
        for k_cache, v_cache, tables, lens, q in inputs:
            times.append(bench_ms(lambda: tpa.paged_decode_attention(
                q, k_cache, v_cache, tables, lens, hd**-0.5, tile_n=tile, num_warps=warps, num_stages=stages)))
        results[f"tile{tile}-w{warps}-s{stages}"] = times
    return shapes, results


def _sweep_prefill(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> tuple[list, dict]:
    import itertools

    from flotilla.kernels import triton_paged_attention as tpa

    kvh, hd, h = args.kv_heads, args.head_dim, args.heads
    shapes = [(1, 2048), (4, 1024), (16, 256)]
    inputs = []
    for batch, n in shapes:
        tokens = batch * n
        inputs.append((torch.randn(tokens, h, hd, dtype=dtype, device=device),
                       torch.randn(tokens, kvh, hd, dtype=dtype, device=device),
                       torch.randn(tokens, kvh, hd, dtype=dtype, device=device),
                       torch.arange(0, tokens + 1, n, dtype=torch.int32, device=device)))
    results = {}
    for bm, bn, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        tpa.PREFILL_LAUNCH_OVERRIDE = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
        try:
            times = [bench_ms(lambda: tpa.varlen_causal_attention(q, k, v, qsl, hd**-0.5)) for q, k, v, qsl in inputs]
        except Exception as e:  # noqa: BLE001  (a shape the compiler refuses, e.g. out of shared memory)
            times = [float("inf")] * len(inputs)
            print(f"prefill m{bm}-n{bn}-w{warps}-s{stages}: {type(e).__name__}")
        finally:
            tpa.PREFILL_LAUNCH_OVERRIDE = None
        results[f"m{bm}-n{bn}-w{warps}-s{stages}"] = times
    return shapes, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU: the Triton kernels' figures (bandwidth, TFLOP/s) are "
              "only meaningful on one. On the CPU, the kernels' correctness is checked by "
              "`TRITON_INTERPRET=1 pytest tests/test_kernels_*.py` instead.", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    import triton

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}, triton {triton.__version__}, "
          f"python {platform.python_version()}")
    print(f"shapes: {args.heads} query heads, {args.kv_heads} KV heads, head_dim {args.head_dim}, "
          f"block_size {args.block_size}, {args.dtype}")
    if args.sweep:
        results = sweep(args, dtype, device)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(command=sys.argv, device=torch.cuda.get_device_name(device), sweep=results), f)
        return 0
    copy_bw, decode, prefill = None, [], []
    if args.only != "prefill":
        copy_bw = copy_bandwidth(device)
        print(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)")
        decode = bench_decode(args, dtype, device, copy_bw)
        print("\ndecode (paged, flash-decoding)")
        print(f"{'batch':>6} {'context':>8} {'ms':>9} {'GB/s':>8} {'of copy':>8} {'splits':>6}")
        for r in decode:
            if "skipped" in r:
                print(f"{r['batch']:>6} {r['context']:>8}   skipped: {r['skipped']}")
            else:
                print(f"{r['batch']:>6} {r['context']:>8} {r['ms']:>9.3f} {r['GB/s']:>8.0f} "
                      f"{r['fraction_of_copy_bw']:>8.2f} {r['num_splits']:>6}")

    if args.only != "decode":
        prefill = bench_prefill(args, dtype, device)
        print("\nprefill (causal) TFLOP/s and ratio to SDPA")
        print(f"{'batch':>6} {'seq_len':>8} {'fresh':>8} {'paged':>8} {'sdpa':>8} {'fresh/sdpa':>10} "
              f"{'paged/sdpa':>10}")
        for r in prefill:
            print(f"{r['batch']:>6} {r['seq_len']:>8} {r['fresh_TFLOPs']:>8.1f} {r['paged_TFLOPs']:>8.1f} "
                  f"{r['sdpa_TFLOPs']:>8.1f} {r['fresh_vs_sdpa']:>10.2f} {r['paged_vs_sdpa']:>10.2f}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=sys.argv, device=torch.cuda.get_device_name(device),
                           copy_bandwidth_GBps=None if copy_bw is None else copy_bw / 1e9, decode=decode,
                           prefill=prefill), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
