"""Compile every Triton kernel the GPU path launches for an NVIDIA GPU, on a machine without one.

The CPU suite runs the kernels under ``TRITON_INTERPRET=1``, which checks what they compute but not that the
compiler takes them: a loop-carried value whose type changes, a shape the code generator refuses, or a launch that
wants more shared memory than the GPU has pass the interpreter and fail on the first GPU call. Here each kernel's
launcher runs on CPU tensors with the launch shape it uses on CUDA (Llama-3-8B and Gemma-2 heads, bf16 and fp16);
its launch is caught before any driver sees it, bound and specialised as Triton's launcher would (alignment,
divisibility) and compiled to a cubin for the target. Prints each kernel's registers a thread, spill stack and
shared memory; exits 1 if any fails to compile or needs more shared memory than the target has. Uses Triton's
launch internals (``create_function_from_signature``, ``JITFunction._pack_args``), so it follows the installed
Triton, not a fixed API.

    python3 benchmarks/kernels_compile.py [--arch 90] [--only 'prefill llama3'] [--json out.json]

Needs the Triton wheel's NVIDIA backend (ptxas ships in it); no CUDA, no GPU. Do not set TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Shared memory a block may use (bytes): sm_80 (A100) 163 KB, sm_89 (L40) 99 KB, sm_90 (H100/H200) 227 KB.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def capture_launches(cases) -> list[tuple[str, object, tuple, dict]]:
    """Run each case's launcher with ``JITFunction.run`` replaced by a recorder: (case, kernel, args, kwargs) per
    launch, nothing executed."""
    from triton.runtime.jit import JITFunction

    launches: list = []
    current = [""]

    def record(self, *args, grid, warmup, **kwargs):  # noqa: ARG001  (the grid does not change the code)
        launches.append((current[0], self, args, kwargs))

    original = JITFunction.run
    JITFunction.run = record
    try:
        for name, case in cases:
            current[0] = name
            case()
    finally:
        JITFunction.run = original
    return launches


def compile_launch(kernel, args: tuple, kwargs: dict, arch: int):
    """Bind and specialise one caught launch as ``JITFunction.run`` does, then compile it for ``arch``."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = _target(arch)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(compiled) -> dict:
    """Registers a thread, spill stack (bytes) and static shared memory from the cubin; dynamic shared memory
    (what a pipelined kernel mostly uses) from the compiler's metadata."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {text[:200]}")
    return dict(registers=int(m[1]), spill_stack_bytes=int(m[2]),
                shared_bytes=int(m[3]) + int(compiled.metadata.shared))


def cases():
    """(name, launcher call) pairs: every Triton kernel in ``flotilla.kernels`` at its CUDA launch shape."""
    import torch

    from flotilla.kernels import triton_paged_attention as tpa
    from flotilla.kernels.lora import lora_batch
    from flotilla.kernels.triton_cache import copy_blocks, write_kv_cache
    from flotilla.kernels.triton_elementwise import rms_norm, rotary_embedding, silu_and_mul
    from flotilla.kernels.triton_lora import lora_expand_triton, lora_shrink_triton
    from flotilla.kernels.triton_moe import fused_moe

    out = []
    block = 16
    # (name, heads, kv heads, head_dim, window, softcap): Llama-3-8B, and Gemma-2-9B's sliding, capped layers
    for family, heads, kv, hd, window, cap in (("llama3-8b", 32, 8, 128, None, None),
                                               ("gemma2-9b", 16, 8, 256, 4096, 50.0)):
        for dtype in (torch.bfloat16, torch.float16):
            tag = f"{family} {str(dtype).split('.')[-1]}"
            k_cache = torch.empty(64, kv, block, hd, dtype=dtype)
            v_cache = torch.empty_like(k_cache)
            tables = torch.zeros(4, 16, dtype=torch.int32)
            lens = torch.full((4,), 200, dtype=torch.int32)
            qsl = torch.tensor([0, 100, 150, 199, 200], dtype=torch.int32)
            q = torch.empty(200, heads, hd, dtype=dtype)
            qkv = torch.empty(200, (heads + 2 * kv) * hd, dtype=dtype)  # K and V as split from the projection
            k = qkv[:, heads * hd:(heads + kv) * hd].view(200, kv, hd)
            v = qkv[:, (heads + kv) * hd:].view(200, kv, hd)
            kw = dict(window=window, softcap=cap)

            def prefill(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, tables=tables, lens=lens, qsl=qsl, kw=kw):
                tpa.PREFILL_LAUNCH_OVERRIDE = tpa.cuda_prefill_launch(q.shape[-1])  # CUDA's, not the interpreter's
                try:
                    tpa.varlen_causal_attention(q, k, v, qsl, 0.1, **kw)
                    tpa.paged_prefill_attention(q, k_cache, v_cache, tables, lens, qsl, 0.1, **kw)
                finally:
                    tpa.PREFILL_LAUNCH_OVERRIDE = None

            def decode(q=q[:4], k_cache=k_cache, v_cache=v_cache, tables=tables, lens=lens, kw=kw):
                for splits in (1, 4):  # one pass, and split-K with its merge
                    tpa.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1, num_splits=splits,
                                               tile_n=tpa.DECODE_TILE_N, num_warps=tpa.DECODE_NUM_WARPS,
                                               num_stages=tpa.DECODE_NUM_STAGES, **kw)

            def cache(k=k, v=v, k_cache=k_cache, v_cache=v_cache):
                write_kv_cache(k, v, k_cache, v_cache, torch.arange(200))
                copy_blocks(k_cache, v_cache, torch.tensor([[0, 1], [2, 3]]))

            out += [(f"prefill {tag}", prefill), (f"decode {tag}", decode), (f"cache {tag}", cache)]
        hidden = heads * hd

        def elementwise(hidden=hidden, hd=hd, heads=heads, kv=kv, dtype=torch.bfloat16):
            x = torch.empty(8, hidden, dtype=dtype)
            rms_norm(x, torch.empty(hidden, dtype=dtype), 1e-6)
            rms_norm(x, torch.empty(hidden, dtype=dtype), 1e-6, residual=torch.empty_like(x))
            qkv = torch.empty(8, (heads + 2 * kv) * hd, dtype=dtype)
            rotary_embedding(torch.arange(8), qkv[:, :heads * hd].view(8, heads, hd),
                             qkv[:, heads * hd:(heads + kv) * hd].view(8, kv, hd),
                             torch.empty(4096, hd // 2), torch.empty(4096, hd // 2))
            silu_and_mul(torch.empty(8, 2 * 14336, dtype=dtype))

        out.append((f"elementwise {family} bf16", elementwise))

    def lora(dtype=torch.bfloat16):
        batch = lora_batch([0] * 40 + [1] * 3 + [-1] * 5, "cpu")
        x = torch.empty(48, 4096, dtype=dtype)
        a = torch.empty(2, 16, 4096, dtype=dtype)  # [slots, rank, in]
        b = torch.empty(2, 4096, 16, dtype=dtype)  # [slots, out, rank]
        lora_expand_triton(lora_shrink_triton(x, a, batch), b, batch, torch.empty(48, 4096, dtype=dtype))

    def moe(dtype=torch.bfloat16):
        x = torch.empty(16, 2048, dtype=dtype)
        ids = torch.arange(32).view(16, 2) % 8
        fused_moe(x, torch.empty(8, 2 * 1408, 2048, dtype=dtype), torch.empty(8, 2048, 1408, dtype=dtype),
                  torch.full((16, 2), 0.5, dtype=dtype), ids, lambda h: h[:, :h.shape[1] // 2])

    out += [("lora bf16", lora), ("moe bf16", moe)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10: 90 (H100/H200), 80 (A100)")
    p.add_argument("--only", default="", help="only the cases whose name contains this (e.g. 'prefill llama3')")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels_compile: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    print(f"$ python3 benchmarks/kernels_compile.py --arch {args.arch}")
    launches = capture_launches([(name, case) for name, case in cases() if args.only in name])
    rows, failed = [], 0
    seen: set = set()
    for case, kernel, kargs, kkwargs in launches:
        try:
            compiled = compile_launch(kernel, kargs, kkwargs, args.arch)
        except Exception as e:  # noqa: BLE001  (every failure is reported, then the exit status says so)
            failed += 1
            lines = [line for line in str(e).splitlines() if line.strip()] or [""]
            message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1].strip()}"  # where, then what
            print(f"FAIL {case}: {kernel.__name__}: {type(e).__name__}: {message}")
            rows.append(dict(case=case, kernel=kernel.__name__, error=f"{type(e).__name__}: {message}"))
            continue
        key = (kernel.__name__, compiled.hash)
        if key in seen:
            continue
        seen.add(key)
        usage = resource_usage(compiled)
        fits = usage["shared_bytes"] <= SHARED_LIMIT.get(args.arch, 101376)
        failed += not fits
        rows.append(dict(case=case, kernel=kernel.__name__, num_warps=compiled.metadata.num_warps,
                         num_stages=compiled.metadata.num_stages, shared_fits=fits, **usage))
        print(f"{'ok  ' if fits else 'FAIL'} {case:28} {kernel.__name__:24} warps {compiled.metadata.num_warps} "
              f"stages {compiled.metadata.num_stages}  regs {usage['registers']:3}  spills "
              f"{usage['spill_stack_bytes']:5} B  shared {usage['shared_bytes']:6} B"
              + ("" if fits else f" (over the sm_{args.arch} limit)"))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(command=sys.argv, arch=args.arch, kernels=rows), indent=1))
    print(f"{len(rows)} kernels compiled for sm_{args.arch}, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
