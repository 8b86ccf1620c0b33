"""Online serving benchmark, like ``vllm bench serve``: Poisson arrivals against an OpenAI-compatible
server, streamed completions, TTFT / ITL / E2E percentiles and throughput, a JSON report and a PNG plot.

    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --request-rate 2 --num-prompts 64

Works against Flotilla or vLLM alike (it only speaks the OpenAI streaming API). Prompts are random token
ids of mixed lengths, so every request's prompt and output length are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx


@dataclass
class RequestResult:
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    error: str | None = None


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def pick(p: float) -> float:
        return s[min(int(round(p / 100 * (len(s) - 1))), len(s) - 1)]

    return {"mean": sum(s) / len(s), "p50": pick(50), "p95": pick(95), "p99": pick(99)}


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
                      headers: dict[str, str]) -> RequestResult:
    result = RequestResult(prompt_tokens=len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.0, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.e2e = time.perf_counter() - start
    except httpx.HTTPError as e:
        result.error = repr(e)
    return result


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    prompts = [[rng.randint(100, 30000) for _ in range(rng.randint(args.min_input, args.max_input))]
               for _ in range(args.num_prompts)]
    outputs = [rng.randint(args.min_output, args.max_output) for _ in range(args.num_prompts)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = f"{args.base_url}/v1/completions"
    limit = asyncio.Semaphore(args.max_concurrency or args.num_prompts)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        model = args.model or (await client.get(f"{args.base_url}/v1/models", headers=headers)).json()["data"][0]["id"]

        async def limited(p: list[int], n: int) -> RequestResult:
            async with limit:
                return await one_request(client, url, model, p, n, headers)

        tasks = []
        start = time.perf_counter()
        for p, n in zip(prompts, outputs):
            tasks.append(asyncio.create_task(limited(p, n)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ok = [r for r in results if r.error is None]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "model": model, "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "num_prompts": args.num_prompts, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration, "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
        "e2e_s": percentiles([r.e2e for r in ok if r.e2e is not None]),
        "requests": [asdict(r) | {"itl": None} for r in results],
    }


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reqs = [r for r in report["requests"] if r["error"] is None]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].hist([r["ttft"] for r in reqs], bins=30)
    axes[0].set(title="TTFT", xlabel="seconds", ylabel="requests")
    axes[1].scatter([r["prompt_tokens"] for r in reqs], [r["e2e"] for r in reqs], s=8)
    axes[1].set(title="E2E latency vs prompt length", xlabel="prompt tokens", ylabel="seconds")
    for name, key in (("p50", "p50"), ("p95", "p95"), ("p99", "p99")):
        axes[2].bar([f"TTFT {name}", f"ITL {name}", f"E2E {name}"],
                    [report["ttft_s"].get(key, 0), report["itl_s"].get(key, 0), report["e2e_s"].get(key, 0)])
    axes[2].set(title="latency percentiles (s)", yscale="log")
    axes[2].tick_params(axis="x", rotation=60)
    fig.suptitle(f"{report['model']}: rate {report['request_rate']}/s, {report['output_throughput']:.1f} out tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--api-key", default=os.environ.get("FLOTILLA_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson rate in requests/s")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--min-input", type=int, default=16)
    p.add_argument("--max-input", type=int, default=512)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/serve", help="writes OUT.json and OUT.png")
    args = p.parse_args()
    report = asyncio.run(run(args))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(f"{args.out}.json", "w") as f:
        json.dump(report, f, indent=1)
    try:
        plot(report, f"{args.out}.png")
    except ImportError:
        print("matplotlib missing: no plot written", file=sys.stderr)
    summary = {k: v for k, v in report.items() if k != "requests"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
