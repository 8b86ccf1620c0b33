"""One reconciliation of one InferenceService: spec -> fit check -> children applied -> status.

Level-triggered: it looks only at the object and the cluster as they are now, so running it again (on
resume, on a child's drift, on a retry) is always safe. It returns what happened instead of raising,
and the kopf handlers turn the outcome into status, events and kopf errors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from flotilla.operator import fit
from flotilla.operator.cluster import ApiError, Cluster, KindNotInstalled, NotFound, label_selector
from flotilla.operator.model_cache import LOADER_LABEL, CacheState, cache_state, needs_loader
from flotilla.operator.render import render_children, render_loader_job, selector_labels
from flotilla.operator.router_objects import render_router, router_url
from flotilla.operator.settings import OperatorSettings
from flotilla.operator.spec import InferenceService, SpecError, parse_service
from flotilla.operator.status import DeploymentState, Observation, pod_problems, status_patch


@dataclass(frozen=True)
class Event:
    type: str  # "Normal" | "Warning"
    reason: str
    message: str


@dataclass
class Outcome:
    """What a reconciliation did. `error` is (reason, message, permanent, retry delay seconds)."""

    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    error: tuple[str, str, bool, int] | None = None


def _model_config(svc: InferenceService, cluster: Cluster) -> dict[str, Any] | None:
    if svc.model.config is not None:
        return dict(svc.model.config)
    ref = svc.model.config_map_ref
    if ref is None:
        return None
    return cluster.config_map_json(svc.namespace, ref.name, ref.key)


def _gpu_memory(svc: InferenceService, cluster: Cluster) -> int | None:
    if svc.resources.gpu_memory_bytes or svc.resources.gpus == 0:
        return svc.resources.gpu_memory_bytes
    # Only nodes the pod could land on: the nodeSelector's, and among them those that say.
    return fit.gpu_memory_from_nodes(cluster.node_labels(svc.node_selector))


def reconcile(body: Mapping[str, Any], cluster: Cluster, settings: OperatorSettings,
              now: str) -> Outcome:
    """Bring the cluster in line with one InferenceService object; never raises for expected failures."""
    out = Outcome()
    previous = (body.get("status") or {}).get("conditions") or ()
    generation = int((body.get("metadata") or {}).get("generation") or 0)
    namespace = (body.get("metadata") or {}).get("namespace", "default")
    cache: CacheState | None = None  # the shared model cache's state, once known

    def finish(svc: InferenceService | None, deployment: Mapping[str, Any] | None,
               problem: tuple[str, str] | None, desired: int) -> Outcome:
        state = DeploymentState.from_object(deployment) if deployment else None
        problems: tuple = ()
        if svc is not None and state is not None and state.ready_replicas < desired:
            try:
                problems = tuple(p for pod in cluster.pods(namespace, selector_labels(svc))
                                 for p in pod_problems(pod))
            except (ApiError, NotFound):
                problems = ()
        selector = label_selector(selector_labels(svc)) if svc else ""
        endpoint = svc.endpoint if svc else ""
        wakes = bool(svc and svc.autoscaling.enabled and svc.autoscaling.min_replicas == 0
                     and settings.router_mode != "off")
        out.status.update(status_patch(Observation(generation, desired, state, problems, problem, cache, wakes),
                                       previous, now, endpoint, selector))
        router = {"namespace": router_url(namespace), "cluster": settings.router_url}.get(settings.router_mode)
        if router:
            out.status["routerURL"] = router
        return out

    def fail(svc: InferenceService | None, deployment: Mapping[str, Any] | None, reason: str, message: str,
             permanent: bool, delay: int, event: bool = True) -> Outcome:
        """Record why this reconciliation stopped: the kopf error, a Warning event, the status problem."""
        out.error = (reason, message, permanent, delay)
        if event:
            out.events.append(Event("Warning", reason, message))
        return finish(svc, deployment, (reason, message), svc.desired_replicas if svc else 0)

    try:
        svc = parse_service(body, settings.engine_image)
    except SpecError as e:
        return fail(None, None, e.reason, str(e), True, 0)

    try:
        config = _model_config(svc, cluster)
        gpu_memory = _gpu_memory(svc, cluster)
    except NotFound as e:
        return fail(svc, None, "ConfigMissing", f"model config not found: {e}", False, 30)
    except (ApiError, ValueError) as e:
        return fail(svc, None, "ConfigUnreadable", f"cannot read model config or nodes: {e}", False, 30, event=False)

    report = fit.check_fit(svc, config, gpu_memory)
    out.status["fit"] = {"verdict": report.verdict, "message": report.message,
                         "requiredBytes": report.required_bytes, "availableBytes": report.available_bytes}
    if report.verdict == "DoesNotFit":
        return fail(svc, _current_deployment(svc, cluster), "DoesNotFit", report.message, True, 0)
    if report.verdict == "Tight":
        out.events.append(Event("Warning", "TightFit", report.message))

    children = render_children(svc, config, settings.prometheus_address)
    objects, absent = children.objects, children.absent
    deployment = None
    try:
        if needs_loader(svc):
            cache = _model_cache(svc, cluster, now)
            if cache.phase == "Failed":
                out.events.append(Event("Warning", "ModelCacheFailed", cache.message))
            if not cache.ready:
                # Engine pods start only from a filled cache; a fleet already running keeps serving meanwhile.
                objects, absent = tuple(o for o in objects if o["kind"] == "Service"), ()
                deployment = _current_deployment(svc, cluster)
        for obj in objects:
            applied = cluster.apply(obj)
            if obj["kind"] == "Deployment":
                deployment = applied
        for api_version, kind in absent:
            cluster.delete(api_version, kind, svc.namespace, svc.name)
        if settings.router_mode == "namespace":
            for obj in render_router(svc.namespace, settings.router_image, cluster.inference_services(svc.namespace)):
                cluster.apply(obj)
    except KindNotInstalled as e:
        return fail(svc, deployment, "KindNotInstalled", f"{e}; install it or choose another autoscaling.mode",
                    False, 60)
    except (ApiError, NotFound) as e:
        return fail(svc, deployment, "ApplyFailed", str(e), getattr(e, "permanent", False), 15)
    return finish(svc, deployment, None, svc.desired_replicas)


def _model_cache(svc: InferenceService, cluster: Cluster, now: str) -> CacheState:
    """Make sure the loader Job for this service's model exists and lists this service among its owners; read
    where it stands. A Job that failed for good long enough ago is replaced by a fresh one."""
    job = render_loader_job(svc)
    name = job["metadata"]["name"]
    state = cache_state(name, cluster.share(job), cluster.pods(svc.namespace, {LOADER_LABEL: name}), now)
    if state.retry:
        cluster.delete("batch/v1", "Job", svc.namespace, name)
        state = cache_state(name, cluster.share(job), [], now)
    return state


def _current_deployment(svc: InferenceService, cluster: Cluster) -> dict[str, Any] | None:
    """The fleet already running, if any: a spec that does not fit leaves it serving."""
    try:
        return cluster.get("apps/v1", "Deployment", svc.namespace, svc.name)
    except (NotFound, ApiError):
        return None
