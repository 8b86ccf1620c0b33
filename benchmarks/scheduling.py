"""What prefix caching and chunked prefill buy, each as an on/off ratio measured in one run.

    python benchmarks/scheduling.py prefix     # shared-system-prompt chat: TTFT p50/p95, caching on vs off
    python benchmarks/scheduling.py chunked    # long prompts among short chats: p99 ITL of the short ones
    python benchmarks/scheduling.py all

Requests arrive on a Poisson schedule into one ``LLMEngine`` (the bundled SmolLM2 unless --model), driven
step by step; times come from the engine's per-request metrics and per-step output timestamps.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time

from flotilla.engine import EngineArgs, LLMEngine, SamplingParams


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(int(round(p / 100 * (len(s) - 1))), len(s) - 1)] if s else float("nan")


def drive(engine: LLMEngine, arrivals: list[tuple[float, str, list[int], SamplingParams]]) -> dict[str, list[float]]:
    """Feed requests at their arrival offsets; returns each request's output timestamps (relative to its
    arrival), the first being its TTFT."""
    pending = sorted(arrivals, key=lambda a: a[0])
    stamps: dict[str, list[float]] = {}
    arrived: dict[str, float] = {}
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            _, rid, prompt, params = pending.pop(0)
            arrived[rid] = time.perf_counter()
            engine.add_request(rid, prompt, params)
        if not engine.has_unfinished_requests():
            time.sleep(min(0.005, max(pending[0][0] - now, 0)))
            continue
        for out in engine.step():
            t = time.perf_counter() - arrived[out.request_id]
            seen = stamps.setdefault(out.request_id, [])
            seen.extend([t] * (len(out.outputs[0].token_ids) - len(seen)))
    return stamps


def poisson(n: int, rate: float, rng: random.Random) -> list[float]:
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def prefix_scenario(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    system = [rng.randrange(100, 40000) for _ in range(args.system_tokens)]
    times = poisson(args.num_requests, args.rate, rng)
    users = [[rng.randrange(100, 40000) for _ in range(rng.randint(10, 40))] for _ in times]
    params = SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True)
    results = {}
    for caching in (True, False):
        engine = LLMEngine(EngineArgs(model=args.model, dtype=args.dtype, max_model_len=2048,
                                      enable_prefix_caching=caching))
        arrivals = [(t, f"r{i}", system + u, params) for i, (t, u) in enumerate(zip(times, users))]
        stamps = drive(engine, arrivals)
        ttft = [s[0] for s in stamps.values()]
        results[caching] = (pct(ttft, 50), pct(ttft, 95), engine.stats().prefix_cache_hits,
                            engine.stats().prefix_cache_queries)
        print(f"prefix caching {'on ' if caching else 'off'}: TTFT p50 {results[caching][0] * 1e3:.0f} ms, "
              f"p95 {results[caching][1] * 1e3:.0f} ms; prefix hits {results[caching][2]} of "
              f"{results[caching][3]} prompt tokens")
    print(f"TTFT p50 off/on = {results[False][0] / results[True][0]:.2f}x, "
          f"p95 off/on = {results[False][1] / results[True][1]:.2f}x")


def chunked_scenario(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    longs = [(t, [rng.randrange(100, 40000) for _ in range(args.long_tokens)])
             for t in poisson(args.num_long, args.rate / 4, rng)]
    shorts = [(t, [rng.randrange(100, 40000) for _ in range(rng.randint(10, 30))])
              for t in poisson(args.num_requests, args.rate, rng)]
    short_params = SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True)
    long_params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    results = {}
    for chunked in (True, False):
        budget = args.chunk_budget if chunked else 2048
        engine = LLMEngine(EngineArgs(model=args.model, dtype=args.dtype, max_model_len=2048,
                                      max_num_batched_tokens=budget, enable_chunked_prefill=chunked,
                                      enable_prefix_caching=False))
        arrivals = [(t, f"long{i}", p, long_params) for i, (t, p) in enumerate(longs)]
        arrivals += [(t, f"short{i}", p, short_params) for i, (t, p) in enumerate(shorts)]
        stamps = drive(engine, arrivals)
        itl = [b - a for rid, s in stamps.items() if rid.startswith("short") for a, b in zip(s, s[1:])]
        results[chunked] = (pct(itl, 50), pct(itl, 99), max(itl))
        print(f"chunked prefill {'on ' if chunked else 'off'} (budget {budget}): short requests' ITL "
              f"p50 {results[chunked][0] * 1e3:.0f} ms, p99 {results[chunked][1] * 1e3:.0f} ms, "
              f"max {results[chunked][2] * 1e3:.0f} ms")
    print(f"p99 ITL off/on = {results[False][1] / results[True][1]:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["prefix", "chunked", "all"])
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate", type=float, default=2.0, help="requests/s of the short or chat requests")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--system-tokens", type=int, default=768)
    p.add_argument("--num-long", type=int, default=4)
    p.add_argument("--long-tokens", type=int, default=1536)
    p.add_argument("--chunk-budget", type=int, default=256)
    args = p.parse_args()
    print("command: python " + " ".join(sys.argv))
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus; model {args.model or 'bundled SmolLM2'}, {args.dtype}")
    if args.scenario in ("prefix", "all"):
        prefix_scenario(args)
    if args.scenario in ("chunked", "all"):
        chunked_scenario(args)


if __name__ == "__main__":
    main()
