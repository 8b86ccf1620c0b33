"""The builtin autoscaler against real HTTP endpoints: local servers serve Prometheus text rendered by
prometheus_client (as the engines do), the autoscaler scrapes them over TCP and decides."""
from __future__ import annotations

import asyncio
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from flotilla.operator.autoscaler import (
    Activity, EngineSample, Recommendation, decide, history_from_status, history_to_status, parse_metrics, scrape_all,
    track_activity)
from flotilla.operator.spec import AutoscalingSpec


@dataclass
class Engine:
    """What one fake engine reports. `mode` picks a failure: ok, error (HTTP 500), hang, garbage."""

    kv: float = 0.5
    waiting: float = 0.0
    running: float = 4.0
    deprecated_name: bool = False
    mode: str = "ok"
    finished: dict[str, float] | None = None  # requests finished, by finished_reason


def metrics_text(e: Engine) -> bytes:
    registry = CollectorRegistry()
    name = "vllm:gpu_cache_usage_perc" if e.deprecated_name else "vllm:kv_cache_usage_perc"
    Gauge(name, "KV-cache usage. 1 means 100 percent usage.", ["model_name"], registry=registry
          ).labels("m").set(e.kv)
    Gauge("vllm:num_requests_waiting", "Requests waiting.", ["model_name"], registry=registry
          ).labels("m").set(e.waiting)
    Gauge("vllm:num_requests_running", "Requests running.", ["model_name"], registry=registry
          ).labels("m").set(e.running)
    done = Counter("vllm:request_success", "Finished requests.", ["model_name", "finished_reason"], registry=registry)
    for reason, n in (e.finished or {}).items():
        done.labels("m", reason).inc(n)
    Gauge("flotilla:engine_info", "Engine facts.",
          ["block_size", "num_gpu_blocks", "max_model_len", "model_load_seconds", "model_name"],
          registry=registry).labels("16", "2048", "8192", "12.5", "m").set(1)
    return generate_latest(registry)


@asynccontextmanager
async def fleet(engines: list[Engine | None]):
    """Serve each engine on its own localhost port; None is a pod whose port refuses connections."""
    runners, urls = [], []
    for engine in engines:
        if engine is None:
            with socket.socket() as s:  # a port nobody listens on
                s.bind(("127.0.0.1", 0))
                urls.append(f"http://127.0.0.1:{s.getsockname()[1]}/metrics")
            continue

        async def handler(request: web.Request, e: Engine = engine) -> web.Response:
            if e.mode == "error":
                return web.Response(status=500, text="engine error")
            if e.mode == "hang":
                await asyncio.sleep(0.8)  # longer than the scrape timeout below
            if e.mode == "garbage":
                return web.Response(text="<html>not metrics</html>")
            return web.Response(body=metrics_text(e), content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{port}/metrics")
    try:
        yield urls
    finally:
        for runner in runners:
            await runner.cleanup()


def scrape(engines: list[Engine | None]) -> list[EngineSample | None]:
    async def go():
        async with fleet(engines) as urls:
            return await scrape_all(urls, timeout=0.5)
    return asyncio.run(go())


POLICY = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=8, target_kv_cache_utilization=0.8,
                         scale_down_stabilization_seconds=300)


def test_scrape_reads_kv_usage_queue_and_engine_facts_over_http():
    (sample,) = scrape([Engine(kv=0.42, waiting=3, running=7)])
    assert sample.kv_usage == 0.42 and sample.waiting == 3 and sample.running == 7
    facts = sample.facts
    assert (facts.block_size, facts.num_gpu_blocks, facts.max_model_len) == (16, 2048, 8192)
    assert facts.kv_capacity_tokens == 32768 and facts.model_load_seconds == 12.5
    assert facts.as_status()["kvCapacityTokens"] == 32768


def test_scrape_falls_back_to_the_deprecated_gpu_cache_metric():
    (sample,) = scrape([Engine(kv=0.66, deprecated_name=True)])
    assert sample.kv_usage == 0.66


def test_unreachable_erroring_hanging_and_garbage_engines_scrape_as_none():
    samples = scrape([None, Engine(mode="error"), Engine(mode="hang"), Engine(mode="garbage"), Engine(kv=0.1)])
    assert samples[:4] == [None, None, None, None]
    assert samples[4].kv_usage == 0.1


def test_high_kv_usage_scales_up_with_the_hpa_formula():
    samples = scrape([Engine(kv=0.95), Engine(kv=0.95)])
    d = decide(POLICY, 2, samples, (), now=1000)
    assert (d.desired, d.direction, d.reason) == (3, "up", "ScaledUp")  # ceil(2 x 0.95 / 0.8)
    assert "KV cache 95% (target 80%)" in d.message and "2 -> 3" in d.message


def test_queueing_scales_up_even_when_the_kv_cache_has_room():
    policy = AutoscalingSpec(enabled=True, max_replicas=8, target_waiting_requests=4)
    samples = scrape([Engine(kv=0.5, waiting=10), Engine(kv=0.5, waiting=10)])
    d = decide(policy, 2, samples, (), now=1000)
    assert (d.desired, d.direction) == (5, "up")  # ceil(2 x 10 / 4)
    assert "10.0 waiting/pod" in d.message


def test_within_ten_percent_tolerance_nothing_changes():
    d = decide(POLICY, 3, scrape([Engine(kv=0.86)] * 3), (), now=1000)
    assert (d.desired, d.reason) == (3, "WithinTolerance")


def test_scale_down_waits_for_the_stabilisation_window_then_follows_the_highest_recommendation():
    samples = scrape([Engine(kv=0.1)] * 4)  # raw recommendation: ceil(4 x 0.1 / 0.8) = 1
    spike = scrape([Engine(kv=0.45)] * 4)   # raw recommendation: ceil(4 x 0.45 / 0.8) = 3
    history: tuple[Recommendation, ...] = ()
    decisions = []
    for t in range(0, 420, 15):
        d = decide(POLICY, 4, spike if t == 60 else samples, history, now=t)
        history = d.history
        decisions.append((t, d.desired, d.reason))
    held = [x for x in decisions if x[0] < 300]
    assert all(desired == 4 and reason == "Stabilizing" for _, desired, reason in held)
    # Once the window is covered, scale down only as far as the spike at t=60 allows ...
    at_300 = dict((t, desired) for t, desired, _ in decisions)[300]
    assert at_300 == 3
    # ... and all the way once the spike has left the window.
    assert dict((t, desired) for t, desired, _ in decisions)[405] == 1


def test_scale_up_is_immediate_by_default_but_honours_a_scale_up_window():
    hot = scrape([Engine(kv=1.0)] * 2)
    assert decide(POLICY, 2, hot, (), now=0).desired == 3
    slow = AutoscalingSpec(enabled=True, max_replicas=8, scale_up_stabilization_seconds=60)
    d = decide(slow, 2, hot, (), now=0)
    assert (d.desired, d.reason) == (2, "Stabilizing")
    d = decide(slow, 2, hot, (Recommendation(-60, 3),), now=0)
    assert d.desired == 3


def test_bounds_are_honoured_both_ways():
    policy = AutoscalingSpec(enabled=True, min_replicas=2, max_replicas=4, scale_down_stabilization_seconds=0)
    up = decide(policy, 4, scrape([Engine(kv=1.0)] * 4), (), now=0)
    assert (up.desired, up.reason) == (4, "AtBounds")
    down = decide(policy, 3, scrape([Engine(kv=0.05)] * 3), (), now=0)
    assert (down.desired, down.direction) == (2, "down")
    below = decide(policy, 1, scrape([Engine(kv=0.8)]), (), now=0)
    assert below.desired == 2  # a fleet below minReplicas is brought up to it


def test_unreachable_pods_never_cause_a_scale_down():
    policy = AutoscalingSpec(enabled=True, max_replicas=8, scale_down_stabilization_seconds=0)
    samples = scrape([Engine(kv=0.05), Engine(kv=0.05), None])
    d = decide(policy, 3, samples, (), now=0)
    assert (d.desired, d.reason) == (3, "HeldUnreachable")
    assert "1 pod(s) could not be scraped" in d.message
    # The held decision leaves no low recommendation behind to act on later.
    assert d.history == ()


def test_no_scrapeable_pod_holds_the_fleet():
    d = decide(POLICY, 3, scrape([None, None, Engine(mode="error")]), (), now=0)
    assert (d.desired, d.reason) == (3, "NoMetrics")


def test_unreachable_pods_count_as_idle_for_scale_up():
    # One hot engine and one still loading: the fleet is not twice as busy as it can handle.
    d = decide(POLICY, 2, scrape([Engine(kv=1.0), None]), (), now=0)
    assert d.desired == 2
    # Very hot reachable engines still scale the fleet up.
    policy = AutoscalingSpec(enabled=True, max_replicas=8, target_kv_cache_utilization=0.5)
    d = decide(policy, 3, scrape([Engine(kv=1.0), Engine(kv=1.0), None]), (), now=0)
    assert (d.desired, d.direction) == (4, "up")  # ceil(3 x (2/3) / 0.5)


def test_history_round_trips_through_status_and_is_trimmed():
    history = (Recommendation(0.0, 4), Recommendation(15.0, 3))
    assert history_from_status(history_to_status(history)) == history
    d = decide(POLICY, 3, scrape([Engine(kv=0.8)] * 3), history, now=10_000)
    assert all(10_000 - r.time <= 600 for r in d.history)


def test_parse_metrics_rejects_text_without_kv_usage():
    try:
        parse_metrics("# TYPE x gauge\nx 1\n")
    except ValueError as e:
        assert "kv_cache_usage_perc" in str(e)
    else:
        raise AssertionError("expected ValueError")


ZERO = AutoscalingSpec(enabled=True, min_replicas=0, max_replicas=4, scale_to_zero_after_seconds=600,
                       scale_down_stabilization_seconds=0)


def test_the_request_count_is_read_over_every_finish_reason():
    (sample,) = scrape([Engine(finished={"stop": 5, "length": 2})])
    assert sample.requests == 7


def test_an_idle_fleet_scales_to_zero_only_after_the_idle_time_and_stays_there():
    idle = [Engine(kv=0.0, running=0, finished={"stop": 3})] * 2
    start = track_activity(None, 2, scrape(idle), now=1000)
    assert start == Activity(6, 1000, 2)
    # 0% KV cache would make the load rule propose 0: it stops at 1, only idleness reaches 0
    early = decide(ZERO, 2, scrape(idle), (), now=1599, activity=track_activity(start, 2, scrape(idle), 1599))
    assert (early.desired, early.direction) == (1, "down")
    late = decide(ZERO, 2, scrape(idle), (), now=1600, activity=track_activity(start, 2, scrape(idle), 1600))
    assert (late.desired, late.reason) == (0, "ScaledToZero")
    at_zero = decide(ZERO, 0, [], (), now=5000, activity=track_activity(start, 0, [], 5000))
    assert (at_zero.desired, at_zero.direction) == (0, "hold")
    # minReplicas 1 never goes to zero, however idle
    assert decide(POLICY, 1, scrape(idle), (), now=10**6, activity=start).desired == 1


def test_any_sign_of_a_request_restarts_the_idle_clock():
    quiet = [Engine(kv=0.0, running=0, finished={"stop": 3})]
    start = Activity(3, 1000, 1)
    assert track_activity(start, 1, scrape(quiet), 1500) == start  # nothing happened: the clock runs on
    for why, engines, replicas in [
        ("a request finished", [Engine(kv=0.0, running=0, finished={"stop": 4})], 1),
        ("one is running", [Engine(kv=0.1, running=1, finished={"stop": 3})], 1),
        ("one is waiting", [Engine(kv=0.0, running=0, waiting=1, finished={"stop": 2})], 1),
        ("a pod cannot be read", quiet + [None], 1),
        ("woken from zero", quiet, 2),
    ]:
        after = track_activity(start, replicas, scrape(engines), 1500)
        assert after.since == 1500, why
        assert decide(ZERO, replicas, scrape(engines), (), now=1500 + 599, activity=after).desired >= 1, why
