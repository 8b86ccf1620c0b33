"""Where a decode step's time goes on CPU, by part of the model, at several batch sizes (issue 14's profile).

    python benchmarks/profile_steps.py                          # bundled SmolLM2, fp32, batches 1, 16, 64
    python benchmarks/profile_steps.py --dtype bfloat16 --batches 1 16 64 --context 256

Each part is timed by wrapping the functions that make it (the CPU runs them synchronously, so a call's wall time
is its cost): paged attention (the backend's cache write, decode and prefill calls), GEMMs (every projection and the
LM head), elementwise (RMSNorm, rotary, SiLU-and-mul, embedding lookup), the sampler; the rest of the step is Python
and bookkeeping (scheduler, plan, tensor building, detokenizer, outputs). Figures are means over the measured
decode steps, after a warm-up, with every sequence decoding at about `--context` tokens. The baseline in the same run
is the step's own wall time: each part is printed as a share of it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.active = False

    def wrap(self, owner: Any, name: str, part: str) -> None:
        original: Callable = getattr(owner, name)
        timers = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not timers.active:
                return original(*args, **kwargs)
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers.seconds[part] += time.perf_counter() - t

        setattr(owner, name, timed)

    @contextmanager
    def measuring(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False


def instrument(engine: Any) -> Timers:
    import flotilla.engine.models.llama as llama
    from flotilla.engine.layers import linear, norm, rotary

    timers = Timers()
    backend = engine.runner.backend
    for method in ("write_kv", "decode", "prefill_paged", "prefill_fresh"):
        timers.wrap(backend, method, "attention")
    timers.wrap(linear.PackedColumnParallelLinear, "forward", "gemm")
    timers.wrap(linear.RowParallelLinear, "forward", "gemm")
    timers.wrap(linear.VocabParallelEmbedding, "logits", "gemm")
    timers.wrap(linear.VocabParallelEmbedding, "forward", "elementwise")
    timers.wrap(norm.RMSNorm, "forward", "elementwise")
    timers.wrap(rotary.RotaryEmbedding, "forward", "elementwise")
    timers.wrap(llama, "silu_and_mul", "elementwise")
    timers.wrap(type(engine.runner.sampler), "__call__", "sampler")
    return timers


def profile(args: argparse.Namespace, batch: int) -> dict[str, Any]:
    from flotilla.engine import LLMEngine, EngineArgs, SamplingParams

    engine = LLMEngine(EngineArgs(model=args.model, dtype=args.dtype, max_num_seqs=max(batch, 1),
                                  max_model_len=args.context + args.steps + 64, enable_prefix_caching=False,
                                  cpu_kvcache_space_gib=2))
    timers = instrument(engine)
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.steps + args.warmup + 8)
    for i in range(batch):
        engine.add_request(f"r{i}", {"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(args.context)]},
                           params)
    sched = engine.scheduler
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        engine.step()  # prefill everything first
    for _ in range(args.warmup):
        engine.step()
    assert len(engine.scheduler.running) == batch, "every sequence must be decoding"
    walls = []
    with timers.measuring():
        for _ in range(args.steps):
            t = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t)
    step = sum(walls) / len(walls)
    parts = {k: v / args.steps for k, v in timers.seconds.items()}
    parts["python and bookkeeping"] = step - sum(parts.values())
    return {"batch": batch, "step_ms": step * 1e3, "tokens_per_s": batch / step,
            "parts_ms": {k: v * 1e3 for k, v in parts.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--context", type=int, default=256, help="prompt tokens of every sequence")
    p.add_argument("--steps", type=int, default=20, help="decode steps measured")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    import torch

    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, dtype {args.dtype}")
    order = ["attention", "gemm", "elementwise", "sampler", "python and bookkeeping"]
    print(f"\n| batch | step (ms) | tok/s | {' | '.join(order)} |")
    print("| --- | --- | --- |" + " --- |" * len(order))
    results = []
    for batch in args.batches:
        r = profile(args, batch)
        results.append(r)
        cells = [f"{r['parts_ms'].get(k, 0):.1f} ms ({r['parts_ms'].get(k, 0) / r['step_ms']:.0%})" for k in order]
        print(f"| {batch} | {r['step_ms']:.1f} | {r['tokens_per_s']:.1f} | {' | '.join(cells)} |", flush=True)
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
