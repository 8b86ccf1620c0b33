"""The router (``flotilla router``): consistent hashing with bounded loads and the routing key as pure functions,
then the real thing in front of real engine processes on loopback, reached with the openai SDK: the same prefix
lands on the same engine until the load bound moves it, a dead engine is routed around with nothing lost, an
unknown model is a 404, a wrong key a 401, and requests for a model scaled to zero are held until a replica is
ready (or answered 503 with Retry-After). Which engine served what is read from the engines' own /metrics."""

from __future__ import annotations

import asyncio
import collections
import math
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flotilla.router import chwbl
from flotilla.router.app import Router, RouterConfig, ThreadedRouter
from flotilla.router.backends import Backends, StaticBackends
from flotilla.operator.autoscaler import parse_metrics
from flotilla.router.balancer import Balancer
from flotilla.router.prefix import prefix_key
from controlplane import wait_for
from server_process import ServerProcess, free_port

KEY = "sk-router-test"
SYSTEM = {t: f"You are the assistant of tenant {t}. " + "Answer briefly and politely. " * 20 for t in "ABCDEFGH"}


# ---- pure parts ----------------------------------------------------------------------------------------------


def test_a_key_keeps_its_replica_and_a_removed_replica_moves_only_its_own_keys():
    replicas = [f"http://10.0.0.{i}:8000" for i in range(5)]
    ring = chwbl.build_ring(replicas)
    keys = [f"prefix {i}" for i in range(2000)]
    first = {k: chwbl.walk(ring, k)[0] for k in keys}
    assert first == {k: chwbl.walk(chwbl.build_ring(list(reversed(replicas))), k)[0] for k in keys}  # order-free
    shares = collections.Counter(first.values())
    assert set(shares) == set(replicas) and max(shares.values()) < 1.5 * len(keys) / len(replicas)
    smaller = chwbl.build_ring(replicas[1:])
    for k in keys:
        after = chwbl.walk(smaller, k)[0]
        assert after == first[k] if first[k] != replicas[0] else after == chwbl.walk(ring, k)[1]


def test_bounded_loads_hold_every_replica_within_the_bound_and_spill_in_ring_order():
    """One hot key placed over and over while nothing finishes: no replica ever goes above
    ceil(1.25 * (total + 1) / n), and the overflow walks the key's own ring order (few replicas, not all)."""
    replicas = [f"r{i}" for i in range(4)]
    ring = chwbl.build_ring(replicas)
    order = chwbl.walk(ring, "hot")
    loads: dict[str, int] = {}
    reasons = []
    for placed in range(40):
        replica, is_first = chwbl.choose(ring, "hot", loads, 1.25)
        reasons.append(is_first)
        loads[replica] = loads.get(replica, 0) + 1
        assert max(loads.values()) <= math.ceil(1.25 * (placed + 1) / 4)
        if not is_first:
            assert all(loads.get(r, 0) >= loads[replica] - 1 for r in order[:order.index(replica)])
    assert reasons[0] and not all(reasons)
    assert chwbl.choose(ring, "hot", {}, 1.25, exclude=frozenset([order[0]]))[0] == order[1]
    assert chwbl.choose(ring, "hot", {}, 1.25, exclude=frozenset(replicas)) is None


def test_below_the_floor_a_key_stays_home_however_uneven_the_load():
    """With a floor of 4, a hot key's own replica takes 4 in flight while the others are idle (plain CHWBL spills
    the third on 2 replicas); past the floor the bound applies again."""
    ring = chwbl.build_ring(["a", "b"])
    home, other = chwbl.walk(ring, "hot")
    loads = {home: 0, other: 0}
    for _ in range(4):
        replica, first = chwbl.choose(ring, "hot", loads, 1.25, floor=4)
        assert (replica, first) == (home, True)
        loads[home] += 1
    assert chwbl.choose(ring, "hot", loads, 1.25, floor=4) == (other, False)
    assert chwbl.choose(ring, "hot", {home: 2, other: 0}, 1.25) == (other, False)  # no floor: spills at the third


def test_the_routing_key_is_the_start_of_the_prompt():
    chat = lambda system, user: {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    assert prefix_key(chat(SYSTEM["A"], "hi"), 256) == prefix_key(chat(SYSTEM["A"], "what is 2+2?"), 256)
    assert prefix_key(chat(SYSTEM["A"], "hi"), 256) != prefix_key(chat(SYSTEM["B"], "hi"), 256)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "abc"}]}]}
    assert prefix_key(parts, 256) == "user: abc"
    assert prefix_key({"prompt": [5, 6, 7]}, 3) == "5 6"
    assert prefix_key({"prompt": ["first", "second"]}, 256) == "first"
    assert prefix_key({"input": "embed me"}, 5) == "embed"
    assert prefix_key({}, 256) == ""


def test_without_a_prefix_the_least_kv_cache_use_wins_and_a_failed_replica_sits_out():
    now = [0.0]
    balancer = Balancer(eject_seconds=10, clock=lambda: now[0])
    replicas = ("a", "b", "c")
    balancer.kv_usage.update(a=0.5, b=0.1, c=0.3)
    assert balancer.choose(replicas, "").replica == "b"
    balancer.failed("b")
    assert balancer.choose(replicas, "").replica == "c"
    now[0] = 11.0
    assert balancer.choose(replicas, "").replica == "b"
    for r in replicas:
        balancer.failed(r)
    assert balancer.choose(replicas, "") is not None  # all out: all tried again rather than none


# ---- the router in front of real engines ---------------------------------------------------------------------


class RunningRouter(ThreadedRouter):
    """The router on a loopback port, driven by blocking clients."""

    def __init__(self, backends: Backends, config: RouterConfig) -> None:
        super().__init__(Router(backends, config))

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=KEY, max_retries=0, timeout=120)

    def metric(self, name: str, **labels: str) -> float:
        return _sum(httpx.get(f"{self.base}/metrics").text, name, labels)


def _sum(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def engine_metric(engine: ServerProcess, name: str) -> float:
    return _sum(httpx.get(f"{engine.base}/metrics").text, name)


def served_counts(engines) -> list[float]:
    return [engine_metric(e, "vllm:request_success_total") for e in engines]


def start_engine(folder, host: str = "127.0.0.1") -> ServerProcess:
    """A tiny engine with a KV cache of 256 blocks (4,096 tokens: every test here fits) rather than the CPU default
    of 4 GiB, so that the five engines some tests run at once fit in memory beside the suite."""
    return ServerProcess([str(folder), "--dtype", "float32", "--served-model-name", "tiny", "--max-model-len", "512",
                          "--num-gpu-blocks-override", "256"],
                         env={"FLOTILLA_API_KEY": KEY, "TRITON_INTERPRET": "0"}, host=host)


@pytest.fixture(scope="module")
def engines(tiny_llama):
    procs = [start_engine(tiny_llama) for _ in range(3)]
    try:
        yield [p.wait_ready() for p in procs]
    finally:
        for p in procs:
            p.stop()


@pytest.fixture()
def router(engines):
    running = RunningRouter(StaticBackends({"tiny": [e.base for e in engines]}), RouterConfig(api_key=KEY))
    yield running
    running.close()


def chat(client, tenant: str, user: str, max_tokens: int = 4, **kw):
    return client.chat.completions.create(model="tiny", max_tokens=max_tokens, temperature=0, messages=[
        {"role": "system", "content": SYSTEM[tenant]}, {"role": "user", "content": user}], **kw)


def test_one_prefix_stays_on_one_engine_and_different_prefixes_spread(router, engines):
    client = router.client()
    before = served_counts(engines)
    for i in range(6):
        chat(client, "A", f"question {i}")
    after = served_counts(engines)
    assert sorted(a - b for a, b in zip(after, before)) == [0, 0, 6]  # the engines' own count: all on one
    assert router.metric("flotilla_router_routed_requests_total", reason="affinity") == 6
    for tenant in "BCDEFGH":
        chat(client, tenant, "hello")
    spread = [a - b for a, b in zip(served_counts(engines), after)]
    assert sum(spread) == 7 and sum(1 for n in spread if n) >= 2


def test_the_load_bound_moves_a_hot_prefix_and_nothing_more(router, engines):
    """Nine requests of one prefix in flight at once (the engines are stopped with SIGSTOP until the router has
    routed all nine, so none can finish early): no engine gets more than max(floor 4, ceil(1.25 * 9 / 3)) = 4 of
    them (counted by the engines themselves), so the prefix spilled, in ring order; the next request, with the load
    gone, goes back to the prefix's own engine."""
    client = router.client()
    before = served_counts(engines)
    chat(client, "A", "alone")
    home = [a - b for a, b in zip(served_counts(engines), before)].index(1)  # the prefix's own engine
    before = served_counts(engines)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            chat(client, "A", f"question {i}")
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)

    for e in engines:
        e.proc.send_signal(signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(9)]
        for t in threads:
            t.start()
        wait_for(lambda: errors or router.metric("flotilla_router_in_flight_requests") >= 9, timeout=120,
                 what="all nine requests in flight at the router")
    finally:
        for e in engines:
            e.proc.send_signal(signal.SIGCONT)
    for t in threads:
        t.join(120)
    assert not errors
    got = [a - b for a, b in zip(served_counts(engines), before)]
    assert sum(got) == 9 and max(got) <= 4 and sorted(got)[1] > 0
    assert router.metric("flotilla_router_routed_requests_total", reason="spill") > 0
    assert got[home] == max(got)
    before = served_counts(engines)
    chat(client, "A", "alone again")
    assert [a - b for a, b in zip(served_counts(engines), before)] == [int(i == home) for i in range(3)]


def test_streams_pass_through_unchanged(router, engines):
    direct = openai.OpenAI(base_url=f"{engines[0].base}/v1", api_key=KEY, max_retries=0, timeout=120)
    expected = chat(direct, "C", "count", max_tokens=24).choices[0].message.content
    chunks = [c.choices[0].delta.content or "" for c in chat(router.client(), "C", "count", max_tokens=24, stream=True)
              if c.choices]
    assert "".join(chunks) == expected


def test_unknown_models_wrong_keys_and_bad_bodies_get_openai_errors(router):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        router.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    bad = openai.OpenAI(base_url=f"{router.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{router.base}/v1/completions", content=b"{", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert [m.id for m in router.client().models.list().data] == ["tiny"]
    assert httpx.get(f"{router.base}/health").status_code == 200  # probes need no key


def test_engine_errors_come_back_as_the_engine_wrote_them(router):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        router.client().completions.create(model="tiny", prompt="hi", max_tokens=-1)


def test_kv_cache_use_is_read_from_the_engines(router, engines):
    text = httpx.get(f"{engines[0].base}/metrics").text
    assert parse_metrics(text).kv_usage == _sum(text, "vllm:kv_cache_usage_perc")
    router.call(router.router.scrape_once())
    assert set(router.router.balancer.kv_usage) == {e.base for e in engines}


def test_a_dead_engine_is_routed_around_and_no_request_is_lost(tiny_llama):
    procs = [start_engine(tiny_llama) for _ in range(2)]
    procs = [p.wait_ready() for p in procs]
    running = RunningRouter(StaticBackends({"tiny": [p.base for p in procs]}), RouterConfig(api_key=KEY))
    try:
        client = running.client()
        victim = procs[0]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        answers = [chat(client, t, "still there?") for t in "ABCDEFGH"]  # some of them hash to the dead engine
        assert all(a.choices[0].finish_reason == "length" for a in answers)
        assert running.metric("flotilla_router_replica_failures_total", replica=victim.base) >= 1
        assert engine_metric(procs[1], "vllm:request_success_total") == 8
    finally:
        running.close()
        for p in procs:
            p.stop()


class ScaleFromZero(Backends):
    """A model with no replica until woken; waking starts a real engine (as the operator would start a pod)."""

    def __init__(self, folder) -> None:
        super().__init__({"tiny": []})
        self.folder = folder
        self.started: list[ServerProcess] = []  # every engine a wake started (one, unless wakes were repeated)

    @property
    def wakes(self) -> int:
        return len(self.started)

    @property
    def engine(self) -> ServerProcess:
        return self.started[0]

    async def wake(self, model: str) -> None:
        engine = start_engine(self.folder)
        self.started.append(engine)
        await asyncio.to_thread(engine.wait_ready)
        self.set_replicas(model, [engine.base])


def test_requests_for_a_model_scaled_to_zero_are_held_until_a_replica_is_ready(tiny_llama):
    backends = ScaleFromZero(tiny_llama)
    running = RunningRouter(backends, RouterConfig(api_key=KEY))
    try:
        assert running.client().models.list().data[0].model_extra["ready_replicas"] == 0
        results: list = []
        threads = [threading.Thread(target=lambda t=t: results.append(chat(running.client(), t, "wake up")))
                   for t in "ABC"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(results) == 3 and all(r.choices[0].finish_reason == "length" for r in results)
        assert backends.wakes == 1  # one ask, however many requests waited
        assert running.metric("flotilla_router_hold_seconds_count") == 3
        assert engine_metric(backends.engine, "vllm:request_success_total") == 3
    finally:
        running.close()
        for engine in backends.started:
            engine.stop()


class FirstAskUndone(ScaleFromZero):
    """The first ask is lost (the operator scaled to zero again a moment after it landed); the second starts it."""

    def __init__(self, folder) -> None:
        super().__init__(folder)
        self.asks = 0

    async def wake(self, model: str) -> None:
        self.asks += 1
        if self.asks > 1:
            await super().wake(model)


def test_a_held_request_asks_again_when_its_first_ask_is_undone(tiny_llama):
    backends = FirstAskUndone(tiny_llama)
    running = RunningRouter(backends, RouterConfig(api_key=KEY, wake_interval=0.5))
    try:
        assert chat(running.client(), "A", "still asleep?").choices[0].finish_reason == "length"
        assert backends.asks >= 2 and backends.wakes == 1
    finally:
        running.close()
        for engine in backends.started:
            engine.stop()


class CannotWake(Backends):
    async def wake(self, model: str) -> None:
        raise PermissionError("inferenceservices/scale is forbidden")


@pytest.mark.parametrize("backends,max_held,reason", [(Backends, 0, "queue_full"), (Backends, 8, "timeout"),
                                                      (CannotWake, 8, "wake_failed")])
def test_a_hold_that_cannot_end_is_a_503_with_retry_after(backends, max_held, reason):
    """A full queue or a hold past its timeout, and a failed ask for a replica at once (not after the timeout)."""
    hold = 0.2 if reason != "wake_failed" else 600
    running = RunningRouter(backends({"tiny": []}), RouterConfig(api_key=KEY, max_held=max_held, hold_timeout=hold))
    try:
        r = httpx.post(f"{running.base}/v1/completions", json={"model": "tiny", "prompt": "x"},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"] == "30"
        assert r.json()["error"]["type"] == "service_unavailable_error"
        if reason == "wake_failed":
            assert "inferenceservices/scale is forbidden" in r.json()["error"]["message"]
        assert running.metric("flotilla_router_rejected_requests_total", reason=reason) == 1
        assert running.metric("flotilla_router_held_requests") == 0
    finally:
        running.close()


def test_a_replica_that_accepts_and_then_says_nothing_is_given_up_on():
    """A replica whose socket accepts but never answers (a hung process) fails the request after the read timeout
    rather than holding it, and its in-flight slot, forever."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    running = RunningRouter(StaticBackends({"tiny": [url]}), RouterConfig(api_key=KEY, read_timeout=0.5))
    try:
        r = httpx.post(f"{running.base}/v1/completions", json={"model": "tiny", "prompt": "x"},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 503
        assert running.metric("flotilla_router_replica_failures_total", replica=url) == 1
        assert running.metric("flotilla_router_in_flight_requests") == 0
    finally:
        running.close()
        silent.close()


def test_the_router_command_serves_a_static_fleet(engines):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flotilla.cli", "router", "--port", str(port),
                             "--backend", f"tiny={engines[1].base}"], env={"FLOTILLA_API_KEY": KEY, "PATH": ""},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        def up() -> bool:
            assert proc.poll() is None, "flotilla router exited"
            return httpx.get(f"{base}/health").status_code == 200

        wait_for(up, timeout=60, what="flotilla router to answer /health")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
        out = client.completions.create(model="tiny", prompt="once upon", max_tokens=3)
        assert out.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    bad = subprocess.run([sys.executable, "-m", "flotilla.cli", "router", "--backend", "tiny"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("flotilla router: --backend 'tiny'")
