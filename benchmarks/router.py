"""The router (issue 17) on a multi-tenant workload: prefix-aware routing (the router's own consistent hashing with
bounded loads) against round-robin over the same engine replicas, in one run, then the cold start of a scale from
zero.

    python benchmarks/router.py                       # 2 replicas, 4 tenants, defaults below
    python benchmarks/router.py --replicas 2 --tenants 4 --requests 96 --rate 0.5 --out benchmarks/runs/router-cpu.json
    python benchmarks/router.py --kv-blocks 2912      # 1 GiB of KV per replica: every prompt fits everywhere

Workload (seeded): ``--tenants`` system prompts of about 1,000 tokens each (seeded word salad, measured with the
engine's /tokenize), shared by many short chats (a 10-30-token user turn, 16 output tokens, greedy, ``ignore_eos``),
each chat's tenant drawn at random, sent as a Poisson process at ``--rate`` to ``/v1/chat/completions`` with
``stream=True``. TTFT is the time from sending to the first content chunk, as the client sees it through the router.

Both arms go through the same ``flotilla.router.app.Router`` in this process, in front of the same ``--replicas``
``flotilla serve`` processes (bundled SmolLM2-135M, ``--max-model-len 2048``, default dtype, the machine's cores
split between them with OMP_NUM_THREADS, fixed ports so the hash ring is the same in every run); only the
balancer differs: the router's ``Balancer`` (CHWBL on the prompt's first 256 characters) or ``RoundRobin`` below.
The engines are restarted before each arm, so each starts with an empty prefix cache. The prefix-cache hit rate is
the engines' own ``vllm:prefix_cache_hits_total`` / ``vllm:prefix_cache_queries_total`` (tokens), summed over the
replicas, as deltas over the arm.

The KV cache: prefix-aware routing matters when the fleet's cache holds each tenant's prompt once but not once per
replica. By default (``--kv-blocks -1``) each replica gets ``(ceil(tenants / replicas) + 1)`` system prompts' worth
of blocks (at least one 2,048-token sequence's): its share of the tenants under affinity, plus one prompt's worth
for the chats in flight. ``--kv-blocks 0`` leaves the engine's own size (4 GiB on CPU), ``--kv-blocks N`` sets N:
with room for every prompt on every replica, round-robin only pays one extra cold prefill per tenant and replica.

Cold start: a ``Backends`` whose ``wake()`` starts one engine process; one chat is sent to the router while the
model has no replica; reported are the time from sending to the first token and the engine's own start (process
spawn to /health 200).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import itertools
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from flotilla.router import chwbl
from flotilla.router.app import Router, RouterConfig, ThreadedRouter
from flotilla.router.backends import Backends, StaticBackends
from flotilla.router.balancer import Balancer, Choice
from flotilla.router.prefix import prefix_key

BLOCK = 16  # the engine's default KV block size, in tokens

WORDS = """
account action answer area article balance bank basis billing board budget business call card care case change
channel charge check claim client code company contract cost country credit customer data date deadline delivery
department design detail device discount document domain email employee energy error estimate event example
feature fee file form fund goal guide history holiday hour idea income insurance invoice issue item job key
language law lead level license limit line list loan location manager market meeting member message method model
month network notice number offer office order owner package page partner password payment period permit phone
plan policy portal price process product profile project purchase quality question quote rate reason record
refund region report request return review risk route rule safety sale schedule screen season security service
session setting shipment size software source staff standard statement status step stock store subscription
supplier support system task tax team term ticket time tool total training transfer travel trial update upgrade
user value vendor version warranty week window work always carefully clearly politely briefly never only first
please should must may will can cannot if when before after during unless because and or but with without for
about from into over under within between the a an this that each every any our your their its new current
previous monthly annual standard premium basic urgent secure private public internal external local global
""".split()
NAMES = ["Acme Freight", "Borealis Bank", "Cobalt Health", "Dune Telecom", "Ember Insurance", "Fjord Travel",
         "Granite Energy", "Harbor Retail", "Iris Software", "Juniper Legal", "Kestrel Motors", "Lumen Education"]


# ---- the machine and the engines -------------------------------------------------------------------------------


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return {"cpu": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "torch": importlib.metadata.version("torch"), "python": platform.python_version()}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds (TIME_WAIT is no obstacle)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Engine:
    """One ``flotilla serve`` process (the bundled model) on a loopback port."""

    def __init__(self, port: int, args: argparse.Namespace, logdir: str) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "flotilla.engine.serve", "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", "2048", "--disable-log-requests", *engine_flags(args)]
        env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": str(args.threads)}
        self.log_path = os.path.join(logdir, f"engine-{port}-{time.monotonic_ns()}.log")
        self.log = open(self.log_path, "w")
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.ready_s: float | None = None

    def wait_ready(self, timeout: float = 300.0) -> "Engine":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine on {self.port} exited with {self.proc.returncode}: see {self.log_path}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    self.ready_s = time.perf_counter() - self.spawned
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # polling for readiness (50 ms resolution on the start time)
        raise TimeoutError(f"engine on {self.port} not ready after {timeout:.0f}s: see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def engine_flags(args: argparse.Namespace) -> list[str]:
    return ["--num-gpu-blocks-override", str(args.kv_blocks)] if args.kv_blocks > 0 else []


def start_engines(ports: list[int], args: argparse.Namespace, logdir: str) -> list[Engine]:
    engines = [Engine(p, args, logdir) for p in ports]
    try:
        return [e.wait_ready() for e in engines]
    except BaseException:
        for e in engines:
            e.stop()
        raise


def scrape(base: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for s in family.samples:
            totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


# ---- round-robin and the router in a thread --------------------------------------------------------------------


class RoundRobin(Balancer):
    """The baseline: the next replica in turn, whatever the prompt (the router's in-flight counts, failure ejection
    and KV scraping are inherited unchanged, so only the choice differs)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._turn = itertools.count()

    def choose(self, replicas: tuple[str, ...], key: str, tried: frozenset[str] = frozenset()) -> Choice | None:
        exclude = self.ejected(replicas) | tried
        left = [r for r in sorted(replicas) if r not in exclude]
        if not left:
            return None
        return Choice(left[next(self._turn) % len(left)], "round_robin")


class RunningRouter(ThreadedRouter):
    """A ``Router`` on a loopback port, its event loop in its own thread."""

    def __init__(self, backends: Backends, balancer: Balancer | None = None) -> None:
        router = Router(backends, RouterConfig())
        if balancer is not None:
            router.balancer = balancer
        super().__init__(router)

    def metrics(self) -> dict[tuple, float]:
        out: dict[tuple, float] = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.base}/metrics", timeout=10).text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


# ---- the workload ----------------------------------------------------------------------------------------------


def tokens(base: str, **body) -> int:
    return httpx.post(f"{base}/tokenize", json=body, timeout=60).json()["count"]


def system_prompts(rng: random.Random, n: int, target: int, base: str) -> list[str]:
    """``n`` varied system prompts of at least ``target`` tokens (by the engine's tokenizer)."""
    def sentence() -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 18))]
        return " ".join(words).capitalize() + "."

    prompts = []
    for i in range(n):
        name = NAMES[i % len(NAMES)] + (f" {i // len(NAMES) + 1}" if i >= len(NAMES) else "")
        text = f"You are the support assistant of {name}. " + " ".join(sentence() for _ in range(40))
        while (count := tokens(base, prompt=text)) < target:
            text += " " + " ".join(sentence() for _ in range(max(1, (target - count) // 16)))
        prompts.append(text)
    return prompts


@dataclass
class Chat:
    at: float  # seconds after the arm's start
    tenant: int
    user: str


def schedule(rng: random.Random, n: int, rate: float, tenants: int) -> list[Chat]:
    chats, t = [], 0.0
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 18)))
        chats.append(Chat(t, rng.randrange(tenants), f"Question {i}: what about the {words}?"))
        t += rng.expovariate(rate)
    return chats


def body(system: str, user: str, model: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


@dataclass
class Result:
    tenant: int
    sent_at: float
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


async def one_chat(client: httpx.AsyncClient, url: str, payload: dict, result: Result) -> Result:
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if result.ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    result.ttft = time.perf_counter() - start
        result.e2e = time.perf_counter() - start
        if result.ttft is None:
            result.error = "no content"
    except httpx.HTTPError as e:
        result.error = repr(e)
    return result


async def drive(url: str, model: str, prompts: list[str], chats: list[Chat], max_tokens: int) -> tuple[list, float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for c in chats:
            delay = c.at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            result = Result(c.tenant, time.perf_counter() - start)
            tasks.append(asyncio.create_task(one_chat(client, url, body(prompts[c.tenant], c.user, model, max_tokens),
                                                      result)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def pct(values: list[float], p: float) -> float | None:
    s = sorted(values)
    return s[min(int(round(p / 100 * (len(s) - 1))), len(s) - 1)] if s else None


# ---- the arms --------------------------------------------------------------------------------------------------


def run_arm(name: str, balancer: Balancer, ports: list[int], args, logdir, prompts, chats, model) -> dict:
    engines = start_engines(ports, args, logdir)
    try:
        before = [scrape(e.base) for e in engines]
        router = RunningRouter(StaticBackends({model: [e.base for e in engines]}), balancer)
        try:
            results, duration = asyncio.run(drive(f"{router.base}/v1/chat/completions", model, prompts, chats,
                                                  args.max_tokens))
            routed = {}
            for (metric, labels), v in router.metrics().items():
                if metric == "flotilla_router_routed_requests_total":
                    d = dict(labels)
                    routed[f"{d['replica']} {d['reason']}"] = v
        finally:
            router.close()
        after = [scrape(e.base) for e in engines]
    finally:
        for e in engines:
            e.stop()
    per_replica = []
    for e, b, a in zip(engines, before, after):
        d = {k: a.get(k, 0.0) - b.get(k, 0.0) for k in ("vllm:prefix_cache_hits_total",
                                                         "vllm:prefix_cache_queries_total",
                                                         "vllm:request_success_total", "vllm:num_preemptions_total")}
        per_replica.append({"replica": e.base, "ready_s": e.ready_s, "served": d["vllm:request_success_total"],
                            "prefix_hits": d["vllm:prefix_cache_hits_total"],
                            "prefix_queries": d["vllm:prefix_cache_queries_total"],
                            "preemptions": d["vllm:num_preemptions_total"]})
    hits = sum(r["prefix_hits"] for r in per_replica)
    queries = sum(r["prefix_queries"] for r in per_replica)
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft for r in ok]
    return {
        "arm": name, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5], "duration_s": duration,
        "ttft_s": {"p50": pct(ttft, 50), "p90": pct(ttft, 90), "p99": pct(ttft, 99),
                   "mean": sum(ttft) / len(ttft) if ttft else None},
        "e2e_s": {"p50": pct([r.e2e for r in ok], 50), "p99": pct([r.e2e for r in ok], 99)},
        "prefix_hit_rate": hits / queries if queries else None, "prefix_hits": hits, "prefix_queries": queries,
        "replicas": per_replica, "routed": routed,
        "requests": [asdict(r) for r in results],
    }


class ScaleFromZero(Backends):
    """A model with no replica until woken; waking starts one engine process (as the operator starts a pod)."""

    def __init__(self, model: str, port: int, args: argparse.Namespace, logdir: str) -> None:
        super().__init__({model: []})
        self.port, self.args, self.logdir = port, args, logdir
        self.engine: Engine | None = None
        self.wakes = 0
        self.woken_at: float | None = None

    async def wake(self, model: str) -> None:
        self.wakes += 1
        self.woken_at = time.perf_counter()
        self.engine = await asyncio.to_thread(lambda: Engine(self.port, self.args, self.logdir).wait_ready())
        self.set_replicas(model, [self.engine.base])


def cold_start(port: int, args, logdir, prompts: list[str], model: str) -> dict:
    backends = ScaleFromZero(model, port, args, logdir)
    router = RunningRouter(backends)
    try:
        result = Result(0, 0.0)

        async def send() -> None:
            async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
                await one_chat(client, f"{router.base}/v1/chat/completions",
                               body(prompts[0], "Question: hello, are you there?", model, args.max_tokens), result)

        sent = time.perf_counter()
        asyncio.run(send())
        hold = sum(v for (m, _), v in router.metrics().items() if m == "flotilla_router_hold_seconds_sum")
    finally:
        router.close()
        if backends.engine is not None:
            backends.engine.stop()
    if result.error:
        raise RuntimeError(f"cold-start request failed: {result.error}")
    engine = backends.engine
    assert engine is not None and backends.wakes == 1
    ready_after_send = engine.spawned + engine.ready_s - sent
    return {"first_token_s": result.ttft, "e2e_s": result.e2e, "engine_start_s": engine.ready_s,
            "wake_after_send_s": backends.woken_at - sent, "router_hold_s": hold,
            "first_token_after_ready_s": result.ttft - ready_after_send, "wakes": backends.wakes}


# ---- main ------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--requests", type=int, default=96, help="chats per arm")
    p.add_argument("--rate", type=float, default=0.5, help="Poisson arrivals, chats/s")
    p.add_argument("--system-tokens", type=int, default=1000, help="tokens of each tenant's system prompt")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--kv-blocks", type=int, default=-1,
                   help="KV blocks per replica: -1 its share of the system prompts plus one (see above); "
                        "0 the engine's default")
    p.add_argument("--threads", type=int, default=None, help="torch threads per engine (default: cores / replicas)")
    p.add_argument("--base-port", type=int, default=18400, help="replica i listens on BASE + i (a fixed ring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-cold-start", action="store_true")
    p.add_argument("--out", default="benchmarks/runs/router-cpu.json")
    args = p.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.replicas)
    command = "python " + " ".join(sys.argv)
    print("command:", command, flush=True)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores (avx512_bf16: {info['avx512_bf16']}), torch {info['torch']}"
          f"; {args.replicas} replicas x {args.threads} threads", flush=True)
    ports = [args.base_port + i for i in range(args.replicas + 1)]  # the last one: the cold start's
    if busy := [q for q in ports if not port_free(q)]:
        sys.exit(f"ports {busy} are taken: pick another --base-port")
    logdir = tempfile.mkdtemp(prefix="flotilla-router-bench-")
    t0 = time.perf_counter()
    load_start = os.getloadavg()  # other work on the machine shows here (1, 5, 15 minutes)
    rng = random.Random(args.seed)

    # The workload, measured with the engine's tokenizer (one engine, then stopped).
    kv_setting, args.kv_blocks = args.kv_blocks, 2048 // BLOCK
    probe = start_engines(ports[:1], args, logdir)[0]
    try:
        model = httpx.get(f"{probe.base}/v1/models").json()["data"][0]["id"]
        prompts = system_prompts(rng, args.tenants, args.system_tokens, probe.base)
        chat_tokens = [tokens(probe.base, messages=[{"role": "system", "content": s}, {"role": "user", "content": "x"}])
                       for s in prompts]
    finally:
        probe.stop()
    chats = schedule(rng, args.requests, args.rate, args.tenants)
    prompt_blocks = math.ceil(max(chat_tokens) / BLOCK)
    if kv_setting < 0:  # at least one full-length sequence (the engine's own check)
        args.kv_blocks = max((math.ceil(args.tenants / args.replicas) + 1) * prompt_blocks, 2048 // BLOCK)
    else:
        args.kv_blocks = kv_setting
    replicas = [f"http://127.0.0.1:{q}" for q in ports[:args.replicas]]
    ring = chwbl.build_ring(replicas)
    homes = [chwbl.walk(ring, prefix_key(body(s, "", model, 1), RouterConfig().prefix_chars))[0] for s in prompts]
    counts = [sum(1 for c in chats if c.tenant == t) for t in range(args.tenants)]
    print(f"workload: {args.tenants} tenants, system prompts of {min(chat_tokens)}-{max(chat_tokens)} tokens with the "
          f"chat template ({prompt_blocks} blocks), {args.requests} chats per arm at {args.rate}/s (Poisson, seed "
          f"{args.seed}), chats per tenant {counts}, {args.max_tokens} output tokens, greedy", flush=True)
    print(f"KV cache per replica: {args.kv_blocks or 'the engine default'} blocks"
          + (f" ({args.kv_blocks * BLOCK} tokens, {args.kv_blocks / prompt_blocks:.1f} system prompts)"
             if args.kv_blocks else ""), flush=True)
    print("tenants' home replicas on the ring: "
          + ", ".join(f"{t}->{h.rsplit(':', 1)[1]}" for t, h in enumerate(homes)), flush=True)

    arms = {}
    for name, balancer in (("prefix-aware", Balancer(bound=RouterConfig().load_bound)),
                           ("round-robin", RoundRobin(bound=RouterConfig().load_bound))):
        arms[name] = run_arm(name, balancer, ports[:args.replicas], args, logdir, prompts, chats, model)
        a = arms[name]
        print(f"{name}: {a['completed']}/{args.requests} completed in {a['duration_s']:.0f}s, TTFT p50 "
              f"{a['ttft_s']['p50']:.3f}s p90 {a['ttft_s']['p90']:.3f}s p99 {a['ttft_s']['p99']:.3f}s, E2E p50 "
              f"{a['e2e_s']['p50']:.3f}s, prefix hit rate {a['prefix_hit_rate']:.3f}, served per replica "
              f"{[int(r['served']) for r in a['replicas']]}, routed {a['routed']}", flush=True)
        if a["errors"]:
            print(f"  errors: {a['errors']}", flush=True)
    pa, rr = arms["prefix-aware"], arms["round-robin"]
    ratio = {k: rr["ttft_s"][k] / pa["ttft_s"][k] for k in ("p50", "p90", "p99")}
    cold = None if args.skip_cold_start else cold_start(ports[-1], args, logdir, prompts, model)

    print("\n| arm | TTFT p50 | p90 | p99 | E2E p50 | prefix-cache hit rate | completed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for a in (pa, rr):
        t = a["ttft_s"]
        print(f"| {a['arm']} | {t['p50']:.3f} s | {t['p90']:.3f} s | {t['p99']:.3f} s | {a['e2e_s']['p50']:.3f} s | "
              f"{a['prefix_hit_rate']:.1%} | {a['completed']}/{args.requests} |")
    print(f"\nround-robin / prefix-aware TTFT: p50 {ratio['p50']:.2f}x, p90 {ratio['p90']:.2f}x, "
          f"p99 {ratio['p99']:.2f}x")
    if cold:
        print(f"scale from zero: first token {cold['first_token_s']:.2f}s after sending (engine start, spawn to "
              f"/health 200: {cold['engine_start_s']:.2f}s; router hold {cold['router_hold_s']:.2f}s; first token "
              f"{cold['first_token_after_ready_s']:.2f}s after ready)")
    total = time.perf_counter() - t0
    print(f"run time: {total:.0f}s; engine logs in {logdir}")
    report = {"command": command, "machine": info, "run_time_s": total, "loadavg_start": load_start,
              "loadavg_end": os.getloadavg(),
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "workload": {"model": model, "system_prompt_tokens": chat_tokens, "prompt_blocks": prompt_blocks,
                           "chats_per_tenant": counts, "homes": homes},
              "arms": arms, "ttft_ratio_round_robin_over_prefix_aware": ratio, "cold_start": cold}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
