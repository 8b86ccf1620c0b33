"""The builtin autoscaler: scrape each ready engine's /metrics, decide replicas the way the HPA would.

`decide` is a pure function (samples and history in, decision out) so every rule is unit-tested; the
scraping is a thin aiohttp layer. The recommendation history lives in the InferenceService's status,
so stabilisation survives an operator restart or a leadership change.

Rules, in order:
1. proposal per metric: ceil(current × average / target), HPA formula, unchanged within 10% tolerance;
   the largest proposal wins (KV-cache usage, and waiting requests when a target is set);
2. pods that could not be scraped count as idle when scaling up (a pod still loading must not trigger
   more scale-up) and forbid scaling down altogether (no evidence the fleet is idle);
3. stabilisation windows: scale down only to the highest recommendation of the last
   scaleDownStabilizationSeconds, scale up only to the lowest of the last scaleUpStabilizationSeconds;
4. bounds: minReplicas ≤ desired ≤ maxReplicas, and never below 1 on these metrics;
5. scale to zero (minReplicas 0): only after scaleToZeroAfterSeconds with no request at all (``track_activity``
   reads the engines' request counters), and a service at zero stays there until a replica is asked for (the
   router sets spec.replicas through the scale subresource when a request arrives).
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from flotilla.operator.spec import AutoscalingSpec

TOLERANCE = 0.1
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_DEPRECATED = "vllm:gpu_cache_usage_perc"
WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
REQUESTS = "vllm:request_success_total"
ENGINE_INFO = "flotilla:engine_info"


@dataclass(frozen=True)
class EngineFacts:
    """What the engine reports about itself through its info metric."""

    block_size: int
    num_gpu_blocks: int
    max_model_len: int
    model_load_seconds: float
    model_name: str

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_size * self.num_gpu_blocks

    def as_status(self) -> dict[str, object]:
        return {"blockSize": self.block_size, "numGpuBlocks": self.num_gpu_blocks,
                "kvCapacityTokens": self.kv_capacity_tokens, "maxModelLen": self.max_model_len,
                "modelLoadSeconds": self.model_load_seconds, "modelName": self.model_name}


@dataclass(frozen=True)
class EngineSample:
    """One scrape of one engine."""

    kv_usage: float
    waiting: float
    running: float
    facts: EngineFacts | None = None
    requests: float = 0.0  # requests finished since the engine started


def _sample_values(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    values: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values.setdefault(s.name, []).append((s.labels, s.value))
    return values


def parse_metrics(text: str) -> EngineSample:
    """Parse an engine's Prometheus text; raises ValueError when it has no KV-cache usage metric."""
    values = _sample_values(text)
    kv = values.get(KV_USAGE) or values.get(KV_USAGE_DEPRECATED)
    if not kv:
        raise ValueError(f"no {KV_USAGE} (nor {KV_USAGE_DEPRECATED}) in metrics")
    facts = None
    for labels, value in values.get(ENGINE_INFO, ()):
        if value == 1:
            try:
                facts = EngineFacts(int(labels["block_size"]), int(labels["num_gpu_blocks"]),
                                    int(labels["max_model_len"]), float(labels["model_load_seconds"]),
                                    labels.get("model_name", ""))
            except (KeyError, ValueError):
                facts = None
    # One engine serves one model; should it ever carry several series, the fullest one decides.
    return EngineSample(kv_usage=max(v for _, v in kv),
                        waiting=sum(v for _, v in values.get(WAITING, ())),
                        running=sum(v for _, v in values.get(RUNNING, ())),
                        facts=facts, requests=sum(v for _, v in values.get(REQUESTS, ())))


async def scrape(session: aiohttp.ClientSession, url: str, timeout: float = 3.0) -> EngineSample | None:
    """One engine's metrics, or None when it cannot be reached or answers nonsense."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                return None
            return parse_metrics(await response.text())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError):
        return None


async def scrape_all(urls: Sequence[str], timeout: float = 3.0) -> list[EngineSample | None]:
    """Scrape every engine concurrently; the result is aligned with `urls`."""
    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(scrape(session, u, timeout) for u in urls)))


@dataclass(frozen=True)
class Recommendation:
    time: float  # unix seconds
    replicas: int


Direction = Literal["up", "down", "hold"]


@dataclass(frozen=True)
class Decision:
    desired: int
    direction: Direction
    reason: str  # CamelCase, for events and status
    message: str
    kv_usage: float | None  # fleet average over scraped pods
    history: tuple[Recommendation, ...] = field(default=())


@dataclass(frozen=True)
class Activity:
    """When the fleet last did anything: ``requests`` is the fleet's request count then (finished, running and
    waiting, summed over pods), ``replicas`` its size then."""

    requests: float
    since: float
    replicas: int

    def as_status(self) -> dict[str, float]:
        return {"requests": self.requests, "since": self.since, "replicas": self.replicas}

    @classmethod
    def from_status(cls, d: dict | None) -> "Activity | None":
        if not d:
            return None
        return cls(float(d["requests"]), float(d["since"]), int(d["replicas"]))


def track_activity(previous: Activity | None, current: int, samples: Sequence[EngineSample | None],
                   now: float) -> Activity:
    """The fleet's activity after this scrape. Anything that may mean a request counts as activity: a request in
    flight, a count that moved (a restarted pod's counter starting over moves it too), a pod that could not be
    read, or a change of size (a wake from zero starts the clock again)."""
    seen = [s for s in samples if s is not None]
    count = sum(s.requests + s.running + s.waiting for s in seen)
    busy = any(s.running or s.waiting for s in seen) or len(seen) < len(samples)
    if previous is None or busy or count != previous.requests or current != previous.replicas:
        return Activity(count, now, current)
    return previous


def _proposal(current: int, average: float, target: float) -> int:
    ratio = average / target
    if abs(ratio - 1.0) <= TOLERANCE:
        return current
    return math.ceil(current * ratio)


def decide(policy: AutoscalingSpec, current: int, samples: Sequence[EngineSample | None],
           history: Iterable[Recommendation], now: float, activity: Activity | None = None) -> Decision:
    """Desired replicas for a fleet of `current` replicas, given one sample per pod (None: unreachable) and, for
    scale to zero, the fleet's last activity (``track_activity``)."""
    seen = [s for s in samples if s is not None]
    unreachable = len(samples) - len(seen)
    # Keep twice the longest window: an entry older than a window proves the history covers it.
    keep = 2 * max(policy.scale_up_stabilization_seconds, policy.scale_down_stabilization_seconds)
    history = tuple(r for r in history if now - r.time <= keep)
    # Load metrics never take a fleet to zero (an idle engine reads 0% KV cache between requests): only idleness
    # does, below.
    lo, hi = max(policy.min_replicas, 1), policy.max_replicas
    if policy.min_replicas == 0 and current == 0:
        return Decision(0, "hold", "ScaledToZero", "no replicas until a request arrives (the router asks for one)",
                        None, history)
    if policy.min_replicas == 0 and activity is not None and not unreachable and seen:
        idle = now - activity.since
        if idle >= policy.scale_to_zero_after_seconds:
            return Decision(0, "down", "ScaledToZero", f"no request for {idle:.0f}s (scaleToZeroAfterSeconds "
                            f"{policy.scale_to_zero_after_seconds}); {current} -> 0 replicas", None, ())

    if not seen:
        desired = min(max(current, lo), hi)
        return Decision(desired, _direction(current, desired), "NoMetrics",
                        f"no engine could be scraped ({unreachable} unreachable); holding {desired}",
                        None, history)

    kv = sum(s.kv_usage for s in seen) / len(seen)
    waiting = sum(s.waiting for s in seen) / len(seen)
    # Unreachable pods count as idle for a scale-up: a pod that is still loading must not make the
    # fleet look busier than it is.
    n = len(seen) + unreachable
    kv_all, waiting_all = sum(s.kv_usage for s in seen) / n, sum(s.waiting for s in seen) / n
    proposals = {"kv": _proposal(current, kv, policy.target_kv_cache_utilization)}
    if policy.target_waiting_requests is not None:
        proposals["waiting"] = _proposal(current, waiting, policy.target_waiting_requests)
    raw = max(proposals.values())
    if raw > current and unreachable:
        up = {"kv": _proposal(current, kv_all, policy.target_kv_cache_utilization)}
        if policy.target_waiting_requests is not None:
            up["waiting"] = _proposal(current, waiting_all, policy.target_waiting_requests)
        raw = max(max(up.values()), current)
    why = (f"KV cache {kv:.0%} (target {policy.target_kv_cache_utilization:.0%})"
           + (f", {waiting:.1f} waiting/pod (target {policy.target_waiting_requests:g})"
              if policy.target_waiting_requests is not None else "")
           + f" over {len(seen)} pod(s)")

    if raw < current and unreachable:
        desired = min(max(current, lo), hi)
        return Decision(desired, _direction(current, desired), "HeldUnreachable",
                        f"{why}; would scale down to {raw} but {unreachable} pod(s) could not be scraped",
                        kv, history)

    history = history + (Recommendation(now, raw),)
    if raw < current:
        stabilised = max(_window(history, current, now, policy.scale_down_stabilization_seconds))
    elif raw > current:
        stabilised = min(_window(history, current, now, policy.scale_up_stabilization_seconds))
    else:
        stabilised = current
    desired = min(max(stabilised, lo), hi)
    direction = _direction(current, desired)

    if direction == "hold":
        if raw != current and stabilised == current:
            reason, note = "Stabilizing", f"recommends {raw}, held at {current} by the stabilisation window"
        elif raw != current:
            reason, note = "AtBounds", f"recommends {raw}, bounded to [{lo}, {hi}]"
        else:
            reason, note = "WithinTolerance", f"{current} replicas is right"
        return Decision(desired, "hold", reason, f"{why}; {note}", kv, history)
    reason = "ScaledUp" if direction == "up" else "ScaledDown"
    note = f"{current} -> {desired} replicas"
    if desired != raw:
        note += f" (recommended {raw})"
    return Decision(desired, direction, reason, f"{why}; {note}", kv, history)


def _window(history: Sequence[Recommendation], current: int, now: float, seconds: int) -> list[int]:
    """Recommendations within the window. While the history does not yet reach back a whole window
    (operator just started, service just created) the current size counts as one: no scaling on
    evidence shorter than the window."""
    recent = [r.replicas for r in history if now - r.time <= seconds]
    if not any(now - r.time >= seconds for r in history):
        recent.append(current)
    return recent


def _direction(current: int, desired: int) -> Direction:
    return "up" if desired > current else "down" if desired < current else "hold"


def history_from_status(items: Iterable[dict]) -> tuple[Recommendation, ...]:
    return tuple(Recommendation(float(i["time"]), int(i["replicas"])) for i in items)


def history_to_status(history: Iterable[Recommendation]) -> list[dict]:
    return [{"time": r.time, "replicas": r.replicas} for r in history]


def fleet_status(samples: Sequence[EngineSample | None]) -> dict[str, object]:
    """Status fields read from the engines whatever the autoscaling mode: KV usage and engine facts."""
    seen = [s for s in samples if s is not None]
    if not seen:
        return {}
    kv = sum(s.kv_usage for s in seen) / len(seen)
    status: dict[str, object] = {"kvCacheUtilization": round(kv, 4), "kvCacheUsage": f"{kv:.0%}"}
    facts = next((s.facts for s in seen if s.facts is not None), None)
    if facts is not None:
        status["engine"] = facts.as_status()
    return status
