"""``spec.adapters`` into running engines, without a restart: each engine pod is brought to the adapters the spec lists
through the engine's own endpoints (vLLM's ``GET /v1/models``, ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``), and the pod's readiness gate (``render.ADAPTERS_CONDITION``) is set once it has been
brought there, so a new pod joins the Service with its adapters already loaded.

Level-triggered like the rest of the operator: what a pod has is read from the pod each time, compared with the
spec (``plan``, pure), and the difference applied. An adapter whose URI changed is unloaded and loaded again. An
adapter the engine refuses (a bad URI, a rank over ``lora.maxLoraRank``) is reported in status and events with the
engine's reason; it does not hold the pod out of service, and the next pass tries it again.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import aiohttp

from flotilla.operator.render import ADAPTERS_CONDITION, PORT
from flotilla.operator.spec import AdapterSpec


@dataclass(frozen=True)
class PodAdapters:
    """One pod after a pass: the adapters it serves (name -> URI) and the ones it refused (name -> why); ``error``
    when the pod could not be asked at all (it stays as it was)."""

    pod: str
    loaded: Mapping[str, str] = field(default_factory=dict)
    failed: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None


def loaded_adapters(models: Mapping[str, Any]) -> dict[str, str]:
    """The adapters in an engine's ``/v1/models`` answer (the cards with a ``parent``): name -> root (URI)."""
    return {m["id"]: m.get("root") or "" for m in models.get("data") or () if m.get("parent")}


def plan(desired: Sequence[AdapterSpec], loaded: Mapping[str, str]) -> tuple[list[AdapterSpec], list[str]]:
    """(adapters to load, names to unload) that bring a pod holding ``loaded`` to ``desired``; a changed URI is
    both."""
    want = {a.name: a for a in desired}
    unload = sorted(name for name, uri in loaded.items() if name not in want or want[name].uri != uri)
    load = [a for a in desired if a.name not in loaded or a.name in unload]
    return load, unload


def _error(body: str, status: int) -> str:
    """The engine's own message from an error answer (OpenAI's shape), else the status and the start of the body."""
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200]}"


async def sync_pod(session: aiohttp.ClientSession, pod: str, base_url: str, desired: Sequence[AdapterSpec],
                   api_key: str | None = None, timeout: float = 600.0) -> PodAdapters:
    """Bring one engine to ``desired``. Loading reads (and may download) the adapter before the engine answers,
    hence the long ``timeout``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = aiohttp.ClientTimeout(total=timeout)
    try:
        async with session.get(f"{base_url}/v1/models", headers=headers, timeout=limit) as r:
            if r.status != 200:
                return PodAdapters(pod, error=_error(await r.text(), r.status))
            loaded = loaded_adapters(await r.json())
        load, unload = plan(desired, loaded)
        failed: dict[str, str] = {}
        for name in unload:
            async with session.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers,
                                    timeout=limit) as r:
                if r.status in (200, 404):  # 404: gone already
                    loaded.pop(name, None)
                else:
                    failed[name] = _error(await r.text(), r.status)
        for adapter in load:
            async with session.post(f"{base_url}/v1/load_lora_adapter", headers=headers, timeout=limit,
                                    json={"lora_name": adapter.name, "lora_path": adapter.uri}) as r:
                text = await r.text()
                if r.status == 200 or (r.status == 400 and "already been loaded" in text):  # a pass beside this one
                    loaded[adapter.name] = adapter.uri
                else:
                    failed[adapter.name] = _error(text, r.status)
        return PodAdapters(pod, loaded, failed)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        return PodAdapters(pod, error=f"{type(e).__name__}: {e}")


async def sync_pods(targets: Sequence[tuple[str, str]], desired: Sequence[AdapterSpec],
                    api_key: str | None = None) -> list[PodAdapters]:
    """``sync_pod`` on every (pod name, base URL), concurrently."""
    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(sync_pod(session, pod, url, desired, api_key) for pod, url in targets)))


def engines_to_sync(pods: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(name, base URL) of each engine pod whose containers are ready (its server answers) and that is not going
    away: ready ones, and ones held out of service by the adapters' readiness gate alone."""
    out = []
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        st = pod.get("status") or {}
        ready = any(c.get("type") == "ContainersReady" and c.get("status") == "True"
                    for c in st.get("conditions") or ())
        if ready and st.get("podIP"):
            out.append((pod["metadata"]["name"], f"http://{st['podIP']}:{PORT}"))
    return out


def engine_restarts(pod: Mapping[str, Any]) -> int:
    """How often the pod's engine container has restarted: a restarted engine has lost the adapters loaded into it.
    (A count, not the container's start time: the watch and the client library write that time differently.)"""
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        if cs.get("name") == "engine":
            return int(cs.get("restartCount") or 0)
    return 0


GATE_CLOSED_ON_RESTART = {"type": ADAPTERS_CONDITION, "status": "False", "reason": "EngineRestarted",
                          "message": "the engine restarted: its adapters are being loaded again"}


def gate_condition(pod: Mapping[str, Any], loaded: int, wanted: int) -> dict[str, Any]:
    """The readiness gate's condition once the engine running now has been brought to the spec; it names that
    engine's restart count, so a restart shows (``gate_open``)."""
    return {"type": ADAPTERS_CONDITION, "status": "True", "reason": "AdaptersLoaded",
            "message": f"{loaded} of {wanted} adapters loaded into the engine after {engine_restarts(pod)} restarts"}


def _gate(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return next((c for c in (pod.get("status") or {}).get("conditions") or () if c.get("type") == ADAPTERS_CONDITION),
                {})


def gate_open(pod: Mapping[str, Any]) -> bool:
    """The gate is open for the engine running now (not for one that has since restarted)."""
    gate = _gate(pod)
    return (gate.get("status") == "True"
            and str(gate.get("message", "")).endswith(f" after {engine_restarts(pod)} restarts"))


def gate_stale(pod: Mapping[str, Any]) -> bool:
    """Open, but for an engine that has restarted since: it must close before the new engine turns ready."""
    return _gate(pod).get("status") == "True" and not gate_open(pod)


def adapters_status(desired: Sequence[AdapterSpec], results: Sequence[PodAdapters]) -> dict[str, Any]:
    """``status.adapters`` (per adapter: the pods serving it, the last refusal) and ``status.adapterPods`` (per pod:
    what it has loaded) from one pass."""
    adapters = []
    for a in desired:
        serving = sum(1 for r in results if r.loaded.get(a.name) == a.uri)
        entry: dict[str, Any] = {"name": a.name, "uri": a.uri, "readyReplicas": serving}
        why = next((f"{r.pod}: {r.failed[a.name]}" for r in results if a.name in r.failed), None)
        if why:
            entry["message"] = why
        adapters.append(entry)
    pods = []
    for r in sorted(results, key=lambda r: r.pod):
        entry = {"pod": r.pod, "loaded": sorted(r.loaded)}
        if r.error:
            entry["message"] = r.error
        pods.append(entry)
    return {"adapters": adapters, "adapterPods": pods}
