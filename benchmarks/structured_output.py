"""What structured output costs a running server: TPOT of JSON-schema requests against unconstrained ones under the
same load, and the stall (if any) that other streams see while a large schema compiles.

    python benchmarks/structured_output.py                     # bundled SmolLM2, 16 concurrent streams
    python benchmarks/structured_output.py --dtype float32 --concurrency 8 --requests 32

One server, one run. Phases alternate (unconstrained, JSON, unconstrained, JSON), each the same closed loop of
``--concurrency`` clients sending ``--requests`` streamed chat completions; TPOT is each request's time from its first
to its last token over its tokens after the first. The JSON schema is bounded (fixed-size arrays, short strings), so
every constrained answer is about as long as the unconstrained ones (``max_tokens`` with ``ignore_eos``).

The stall: eight unconstrained streams run; one second in, a request with a large schema (``--big-properties``
fields, each an enum or a pattern) arrives (``--max-num-seqs`` leaves it room beside them). The streams' largest inter-token gap while it compiles is compared with
the largest gap of the same load without it, and the big request's TTFT says how long compiling took.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cold_start import flotilla_server  # noqa: E402
from serve import percentiles  # noqa: E402

PEOPLE_SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 5, "maxItems": 5, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "city": {"type": "string", "maxLength": 16},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "role": {"enum": ["engineer", "teacher", "doctor", "artist", "farmer"]}},
        "required": ["name", "city", "age", "role"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False,
}
PROMPTS = ["Invent five people for a story set in {}.", "List five people who live near {}.",
           "Describe five characters from a novel about {}.", "Make up five guests at a wedding in {}."]
PLACES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Perth", "Oslo", "Cusco"]


def big_schema(n: int) -> dict:
    """Many distinct fields (enums and patterns): a schema whose compilation takes long."""
    props = {}
    for i in range(n):
        props[f"field_{i}"] = ({"enum": [f"v{i}_{j}" for j in range(6)]} if i % 2 else
                               {"type": "string", "pattern": f"^[a-z]{{{1 + i % 5},{6 + i % 7}}}-{i}$"})
    return {"type": "object", "properties": props, "required": list(props)[:8], "additionalProperties": False}


async def stream_chat(client: httpx.AsyncClient, base: str, body: dict) -> dict:
    """One streamed chat completion: arrival time of every content chunk, and the token count."""
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True,
                                                                         "stream_options": {"include_usage": True}}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    return {"start": start, "times": times, "tokens": tokens}


def body(i: int, constrained: bool, max_tokens: int) -> dict:
    prompt = PROMPTS[i % len(PROMPTS)].format(PLACES[i % len(PLACES)])
    b = {"messages": [{"role": "user", "content": prompt}], "temperature": 0.8, "seed": i, "max_tokens": max_tokens}
    if constrained:
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": "people", "schema": PEOPLE_SCHEMA}}
    else:
        b["ignore_eos"] = True
    return b


async def phase(base: str, constrained: bool, args: argparse.Namespace, max_tokens: int) -> dict:
    queue = list(range(args.requests))
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
        async def worker() -> None:
            while queue:
                i = queue.pop()
                results.append(await stream_chat(client, base, body(i, constrained, max_tokens)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        duration = time.perf_counter() - t0
    tpot = [(r["times"][-1] - r["times"][0]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    return {"constrained": constrained, "tpot_s": percentiles(tpot), "tokens_mean": statistics.mean(
        r["tokens"] for r in results), "output_tok_s": sum(r["tokens"] for r in results) / duration}


async def stall(base: str, args: argparse.Namespace, with_big: bool) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
        streams = [asyncio.create_task(stream_chat(client, base, body(100 + i, False, 160))) for i in range(8)]
        big = None
        if with_big:
            await asyncio.sleep(1.0)  # the load is streaming: now the big schema arrives
            big_body = {"messages": [{"role": "user", "content": "Fill in the form."}], "max_tokens": 8,
                        "response_format": {"type": "json_schema", "json_schema": {
                            "name": "form", "schema": big_schema(args.big_properties)}}}
            big = await stream_chat(client, base, big_body)
        done = await asyncio.gather(*streams)
    gaps = [b - a for r in done for a, b in zip(r["times"], r["times"][1:])]
    out = {"with_big_schema": with_big, "max_gap_s": max(gaps), "gap_s": percentiles(gaps)}
    if big is not None:
        out["big_schema_ttft_s"] = big["times"][0] - big["start"] if big["times"] else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=32, help="requests per phase")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--big-properties", type=int, default=400)
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args()

    flags = ["--max-model-len", "1024", "--dtype", args.dtype, "--max-num-seqs", str(max(args.concurrency, 9))]
    with flotilla_server(flags) as (base, _):
        # Warm: the schema compiled once (the LRU keeps it), so phases measure decoding, not compiling.
        first = asyncio.run(phase(base, True, argparse.Namespace(concurrency=1, requests=1), 256))
        length = max(16, round(first["tokens_mean"]))
        phases = []
        for _ in range(args.rounds):
            phases.append(asyncio.run(phase(base, False, args, length)))
            phases.append(asyncio.run(phase(base, True, args, 256)))
        stalls = [asyncio.run(stall(base, args, False)), asyncio.run(stall(base, args, True))]

    free = statistics.median(ph["tpot_s"]["p50"] for ph in phases if not ph["constrained"])
    guided = statistics.median(ph["tpot_s"]["p50"] for ph in phases if ph["constrained"])
    report = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
              "server_flags": " ".join(flags), "phases": phases, "stall": stalls,
              "tpot_p50_unconstrained_s": free, "tpot_p50_json_schema_s": guided, "ratio": guided / free}
    print(json.dumps(report, indent=1))
    print(f"TPOT p50: unconstrained {free * 1e3:.1f} ms, JSON schema {guided * 1e3:.1f} ms, "
          f"ratio {guided / free:.3f}")
    base_gap, big = stalls[0]["max_gap_s"], stalls[1]
    print(f"largest inter-token gap of 8 streams: {base_gap * 1e3:.0f} ms without, {big['max_gap_s'] * 1e3:.0f} ms "
          f"while a {args.big_properties}-field schema compiles (its TTFT {big['big_schema_ttft_s']:.2f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
