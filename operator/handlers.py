"""kopf handlers: thin glue from cluster events to `reconcile` and the autoscaler.

- create / update (spec) / resume of an InferenceService -> reconcile, status, events;
- any event on a Deployment, Service or loader Job the operator manages -> reconcile its owners (drift
  repair, fresh readiness and cache state in status);
- a timer per InferenceService -> reconcile again (level-triggered safety net), scrape the engines,
  put KV usage and engine facts in status and, in builtin mode, scale; bring every engine to spec.adapters;
- an engine pod whose server has come up but whose adapters' readiness gate is still closed -> load its adapters
  and open the gate (adapters.py).
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import Any

import kopf

from flotilla.operator import metrics
from flotilla.operator.adapters import (
    GATE_CLOSED_ON_RESTART, adapters_status, engines_to_sync, gate_condition, gate_open, gate_stale, sync_pods)
from flotilla.operator.autoscaler import (
    Activity, decide, fleet_status, history_from_status, history_to_status, scrape_all, track_activity)
from flotilla.operator.cluster import PLURAL, ApiError, KindNotInstalled, KubeCluster, NotFound, peering_objects
from flotilla.operator.reconcile import Outcome, reconcile
from flotilla.operator.render import GROUP, KIND, MANAGED_BY, PORT, VERSION, selector_labels
from flotilla.operator.settings import OperatorSettings
from flotilla.operator.spec import InferenceService, SpecError, parse_service

SETTINGS = OperatorSettings.from_environment()
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cluster(memo: Any) -> KubeCluster:
    return memo.cluster


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    # Progress and diff-base in annotations under our own prefix: the status schema stays ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING  # kopf's own chatter stays in logs; our events are explicit
    settings.watching.server_timeout = 300
    settings.batching.worker_limit = 32
    memo.cluster = KubeCluster()


@kopf.on.startup()
def ensure_peering(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    """Create the peering object the replicas elect through, when it is missing. Shipping it in the
    manifests instead breaks the first `kubectl apply -k` (a custom object in the same apply as its CRD is
    refused), and kopf with a mandatory peering but no such object waits silently, acting never."""
    if settings.peering.standalone or not settings.peering.name:
        return
    try:
        for obj in peering_objects(settings.peering.name, memo.namespaces):
            memo.cluster.apply(obj)
    except KindNotInstalled as e:  # the kopf peering CRDs are installed in the same apply: not served yet
        raise kopf.TemporaryError(f"{e}; install crds/ (kubectl apply -k manifests/)", delay=2) from None


def _post(body: Any, outcome: Outcome, only_new: bool) -> None:
    """Post the outcome's events; periodic paths post only when the Degraded reason changes."""
    previous = {c.get("type"): c.get("reason") for c in (body.get("status") or {}).get("conditions") or ()}
    current = {c["type"]: c["reason"] for c in outcome.status.get("conditions", ())}
    if only_new and previous.get("Degraded") == current.get("Degraded"):
        return
    for event in outcome.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def _raise_for(outcome: Outcome) -> None:
    metrics.RECONCILES.labels("error" if outcome.error else "ok").inc()
    if outcome.error is None:
        return
    reason, message, permanent, delay = outcome.error
    if permanent:
        raise kopf.PermanentError(f"{reason}: {message}")
    raise kopf.TemporaryError(f"{reason}: {message}", delay=delay)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_spec(body: kopf.Body, patch: kopf.Patch, memo: Any, **_: Any) -> None:
    outcome = reconcile(body, _cluster(memo), SETTINGS, _now())
    patch.status.update(outcome.status)
    _post(body, outcome, only_new=False)
    _raise_for(outcome)


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
def on_child(body: kopf.Body, memo: Any, logger: logging.Logger, **_: Any) -> None:
    """Reconcile the owner of a changed child; a shared loader Job has one owner per InferenceService using it."""
    cluster, namespace = _cluster(memo), body["metadata"]["namespace"]
    for owner in body.get("metadata", {}).get("ownerReferences") or ():
        if owner.get("kind") != KIND:
            continue
        try:
            service = cluster.get_service(namespace, owner["name"])
        except (NotFound, ApiError):
            continue  # the owner is gone (garbage collection follows) or unreadable (the timer retries)
        if service["metadata"].get("deletionTimestamp"):
            continue
        outcome = reconcile(service, cluster, SETTINGS, _now())
        try:
            cluster.patch_status(namespace, owner["name"], outcome.status)
        except (NotFound, ApiError) as e:
            logger.warning("status of %s/%s not written: %s", namespace, owner["name"], e)
        _post(service, outcome, only_new=True)


def _ready_pods(pods: list[dict[str, Any]]) -> tuple[list[str], int]:
    """Metrics URLs of ready pods, and the number of live pods (ready or still starting)."""
    urls, live = [], 0
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue  # draining: its load is leaving, not a reason to scale
        live += 1
        st = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or ())
        if ready and st.get("podIP"):
            urls.append(f"http://{st['podIP']}:{PORT}/metrics")
    return urls, live


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.scrape_interval_seconds,
            initial_delay=SETTINGS.scrape_interval_seconds)
async def observe(body: kopf.Body, patch: kopf.Patch, memo: Any, logger: logging.Logger, **_: Any) -> None:
    cluster = _cluster(memo)
    outcome = await asyncio.to_thread(reconcile, body, cluster, SETTINGS, _now())
    patch.status.update(outcome.status)
    _post(body, outcome, only_new=True)
    try:
        svc = parse_service(body, SETTINGS.engine_image)
    except SpecError:
        return
    pods = await asyncio.to_thread(cluster.pods, svc.namespace, selector_labels(svc))
    urls, live = _ready_pods(pods)
    scraped = await scrape_all(urls, SETTINGS.scrape_timeout_seconds)
    # Pods that are live but not ready (loading) count as unreachable: see autoscaler.decide.
    samples = scraped + [None] * (live - len(urls))
    metrics.SCRAPE_FAILURES.inc(sum(1 for s in scraped if s is None))
    fleet = fleet_status(samples)
    patch.status.update(fleet)
    if "kvCacheUtilization" in fleet:
        metrics.KV_CACHE_UTILIZATION.labels(svc.namespace, svc.name).set(float(fleet["kvCacheUtilization"]))
    metrics.DESIRED_REPLICAS.labels(svc.namespace, svc.name).set(svc.desired_replicas)

    if svc.lora is not None:
        adapters = await _sync_adapters(svc, pods, cluster, logger)
        _post_adapter_failures(body, adapters)
        patch.status.update(adapters)

    a = svc.autoscaling
    if not (a.enabled and a.mode == "builtin"):
        return
    previous = (body.get("status") or {}).get("autoscaler") or {}
    now = time.time()
    activity = track_activity(Activity.from_status(previous.get("activity")), svc.desired_replicas, samples, now)
    decision = decide(a, svc.desired_replicas, samples,
                      history_from_status(previous.get("recommendations") or ()), now, activity)
    patch.status["autoscaler"] = {"reason": decision.reason, "message": decision.message,
                                  "recommendations": history_to_status(decision.history),
                                  "activity": activity.as_status()}
    patch.status["desiredReplicas"] = decision.desired
    if decision.desired != svc.replicas:
        await asyncio.to_thread(cluster.scale, svc.namespace, svc.name, decision.desired)
        patch.status["lastScaleTime"] = _now()
        metrics.SCALE_EVENTS.labels(decision.direction).inc()
        kopf.event(body, type="Normal", reason=decision.reason, message=decision.message)
        logger.info("%s: %s", decision.reason, decision.message)
    elif decision.reason != previous.get("reason") and decision.reason in ("HeldUnreachable", "NoMetrics"):
        kopf.event(body, type="Warning", reason=decision.reason, message=decision.message)


async def _sync_adapters(svc: InferenceService, pods: list[dict[str, Any]], cluster: KubeCluster,
                         logger: logging.Logger) -> dict[str, Any]:
    """Bring the engine pods to spec.adapters and open the readiness gate of each one brought there; the status
    of the pass."""
    by_name = {p["metadata"]["name"]: p for p in pods}
    results = await sync_pods(engines_to_sync(pods), svc.adapters)
    for r in results:
        if r.error is None and not gate_open(by_name[r.pod]):
            await _set_gate(cluster, svc.namespace, r.pod,
                            gate_condition(by_name[r.pod], len(r.loaded), len(svc.adapters)), logger)
    return adapters_status(svc.adapters, results)


async def _set_gate(cluster: KubeCluster, namespace: str, pod: str, condition: dict[str, Any],
                    logger: logging.Logger) -> None:
    try:
        await asyncio.to_thread(cluster.set_pod_condition, namespace, pod, {**condition, "lastTransitionTime": _now()})
    except (NotFound, ApiError) as e:  # the next pass tries again
        logger.warning("pod %s/%s: readiness gate not set: %s", namespace, pod, e)


def _post_adapter_failures(body: Any, adapters: dict[str, Any]) -> None:
    """A Warning event when an adapter's refusal is new (not in the status already)."""
    before = {a.get("name"): a.get("message") for a in (body.get("status") or {}).get("adapters") or ()}
    for a in adapters["adapters"]:
        if a.get("message") and before.get(a["name"]) != a["message"]:
            kopf.event(body, type="Warning", reason="AdapterLoadFailed", message=f"{a['name']}: {a['message']}")


@kopf.on.event("", "v1", "pods", labels={"app.kubernetes.io/name": "flotilla-engine", **MANAGED})
async def on_engine_pod(body: kopf.Body, memo: Any, logger: logging.Logger, **_: Any) -> None:
    """A new engine's server is up but its adapters' gate is closed: load them now rather than at the next timer
    tick, so the pod joins the Service as soon as it can serve every adapter. An engine that restarted (its adapters
    gone with it) has its gate closed first, before the kubelet can call it ready again."""
    cluster = _cluster(memo)
    meta = body["metadata"]
    if gate_stale(body):
        await _set_gate(cluster, meta["namespace"], meta["name"], GATE_CLOSED_ON_RESTART, logger)
    if gate_open(body) or not engines_to_sync([body]):
        return
    try:
        service = await asyncio.to_thread(cluster.get_service, meta["namespace"],
                                          meta["labels"]["app.kubernetes.io/instance"])
        svc = parse_service(service, SETTINGS.engine_image)
    except (NotFound, ApiError, SpecError, KeyError):
        return  # no readable owner: the timer reports it
    if svc.lora is not None:
        await _sync_adapters(svc, [dict(body)], cluster, logger)
