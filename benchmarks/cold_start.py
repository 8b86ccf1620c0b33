"""A fresh replica's first traffic: TTFT of the first requests after ``/health`` turns 200, with the engine's
warm-up (the default) and with ``--no-warmup``, each against the same server's TTFT once warm (the baseline in
the same run: a second batch of requests of the same kind).

    python benchmarks/cold_start.py                              # bundled SmolLM2, rate 2, 8 requests per phase
    python benchmarks/cold_start.py --dtype float32 --num-prompts 16

Requests are streamed completions with Poisson arrivals, as ``benchmarks/serve.py`` sends them (``vllm bench
serve`` works the same way).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402  (benchmarks/serve.py: the request driver)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phase(base_url: str, args: argparse.Namespace, seed: int) -> dict:
    ns = argparse.Namespace(base_url=base_url, model=None, api_key=None, num_prompts=args.num_prompts,
                            request_rate=args.request_rate, max_concurrency=None, min_input=16, max_input=512,
                            min_output=16, max_output=64, seed=seed)
    report = asyncio.run(serve.run(ns))
    assert report["failed"] == 0, report["errors"]
    return report["ttft_s"]


@contextlib.contextmanager
def flotilla_server(flags: list[str]) -> Iterator[tuple[str, float]]:
    """``flotilla serve`` (the bundled model) on a free port: its base URL and how long it took to answer /health
    200; stopped with SIGTERM on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "flotilla.engine.serve", "--port", str(port), "--disable-log-requests", *flags]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # polling for readiness, not a measurement
        yield base, time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def one_setting(flag: str, args: argparse.Namespace) -> dict:
    with flotilla_server(["--max-model-len", "1024", "--dtype", args.dtype, flag]) as (base, ready):
        cold = phase(base, args, seed=1)
        warm = phase(base, args, seed=2)
    return {"setting": flag, "ready_s": ready, "cold": cold, "warm": warm}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=8, help="requests per phase")
    p.add_argument("--request-rate", type=float, default=2.0)
    args = p.parse_args()
    print("command: python " + " ".join(sys.argv))
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus; {args.num_prompts} requests per phase at "
          f"{args.request_rate}/s, 16-512 prompt tokens, 16-64 output tokens, dtype {args.dtype}")
    print("\n| setting | /health 200 after | TTFT p50 first traffic | p95 | TTFT p50 warm | first / warm (p50) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for flag in ("--warmup", "--no-warmup"):
        r = one_setting(flag, args)
        c, w = r["cold"], r["warm"]
        print(f"| `{flag}` | {r['ready_s']:.1f} s | {c['p50']:.3f} s | {c['p95']:.3f} s | {w['p50']:.3f} s | "
              f"{c['p50'] / w['p50']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
