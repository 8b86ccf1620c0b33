"""Children's state in, conditions out: the Ready / Progressing / Degraded logic as pure functions.

Conditions follow Kubernetes conventions (metav1.Condition): `status` is "True"/"False", `reason` a
CamelCase word, `message` a sentence for people, and `lastTransitionTime` changes only when `status`
does — so `kubectl wait --for=condition=Ready` and alerting on transitions work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from flotilla.operator.model_cache import CacheState

#: Container waiting reasons that will not fix themselves; a pod stuck in one degrades the service.
STUCK_REASONS = frozenset({"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                           "CreateContainerConfigError", "CreateContainerError", "RunContainerError"})


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str
    lastTransitionTime: str = ""
    observedGeneration: int = 0


@dataclass(frozen=True)
class DeploymentState:
    """The parts of a Deployment's status that matter here."""

    generation: int = 0
    observed_generation: int = 0
    replicas: int = 0
    ready_replicas: int = 0
    updated_replicas: int = 0
    available_replicas: int = 0
    #: Deployment condition type -> (status, reason, message)
    conditions: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> "DeploymentState":
        st = obj.get("status") or {}
        conds = {c["type"]: (c.get("status", "Unknown"), c.get("reason", ""), c.get("message", ""))
                 for c in st.get("conditions") or ()}
        return cls(generation=int((obj.get("metadata") or {}).get("generation") or 0),
                   observed_generation=int(st.get("observedGeneration") or 0),
                   replicas=int(st.get("replicas") or 0), ready_replicas=int(st.get("readyReplicas") or 0),
                   updated_replicas=int(st.get("updatedReplicas") or 0),
                   available_replicas=int(st.get("availableReplicas") or 0), conditions=conds)


@dataclass(frozen=True)
class PodProblem:
    pod: str
    reason: str
    message: str


def pod_problems(pod: Mapping[str, Any]) -> list[PodProblem]:
    """Why a pod will not become ready on its own (empty for healthy or merely loading pods)."""
    name = (pod.get("metadata") or {}).get("name", "?")
    st = pod.get("status") or {}
    found = []
    for c in st.get("conditions") or ():
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            found.append(PodProblem(name, "Unschedulable", c.get("message", "")))
    for cs in st.get("containerStatuses") or ():
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            found.append(PodProblem(name, waiting["reason"], waiting.get("message", "")))
    return found


@dataclass(frozen=True)
class Observation:
    """Everything the condition logic looks at, gathered by the handlers."""

    generation: int
    desired_replicas: int
    deployment: DeploymentState | None
    problems: tuple[PodProblem, ...] = ()
    #: A reason the current spec was not rolled out (InvalidSpec, DoesNotFit, ApplyFailed ...).
    spec_problem: tuple[str, str] | None = None
    #: The shared model cache, when a loader Job fills one; the spec rolls out once it is ready.
    model_cache: CacheState | None = None
    #: Scaled to zero on purpose (minReplicas 0) with a router in front, which starts a replica on a request.
    wakes_on_request: bool = False

    @property
    def waiting_for_cache(self) -> bool:
        return self.model_cache is not None and not self.model_cache.ready


def _progressing(o: Observation) -> tuple[str, str, str]:
    d = o.deployment
    if o.spec_problem:
        reason, message = o.spec_problem
        return "False", reason, f"generation {o.generation} not rolled out: {message}"
    if o.waiting_for_cache:
        c = o.model_cache
        return "True", "WaitingForModelCache", f"engine pods start once the model is cached ({c.phase}: {c.message})"
    if d is None:
        return "True", "Creating", "creating the engine Deployment"
    status, reason, message = d.conditions.get("Progressing", ("Unknown", "", ""))
    if reason == "ProgressDeadlineExceeded":
        return "False", reason, message
    if d.observed_generation < d.generation or d.updated_replicas < o.desired_replicas:
        return "True", "RollingOut", f"{d.updated_replicas}/{o.desired_replicas} replicas updated"
    if d.ready_replicas < o.desired_replicas:
        return "True", "ScalingUp", f"{d.ready_replicas}/{o.desired_replicas} replicas ready"
    if d.replicas > o.desired_replicas:
        return "True", "ScalingDown", f"{d.replicas - o.desired_replicas} replicas draining"
    return "False", "Stable", f"{d.ready_replicas}/{o.desired_replicas} replicas ready"


def _ready(o: Observation) -> tuple[str, str, str]:
    d = o.deployment
    ready = d.ready_replicas if d else 0
    if ready >= 1:
        if ready >= o.desired_replicas:
            return "True", "AllReplicasReady", f"{ready}/{o.desired_replicas} replicas ready"
        return "True", "PartiallyReady", f"{ready}/{o.desired_replicas} replicas ready; serving"
    if o.desired_replicas == 0 and o.wakes_on_request:
        return "True", "ScaledToZero", "no replica while idle; the router starts one on the next request"
    if o.desired_replicas == 0:
        return "False", "ScaledToZero", "replicas is 0"
    if o.spec_problem and d is None:
        return "False", o.spec_problem[0], o.spec_problem[1]
    if o.waiting_for_cache and d is None:
        return "False", "WaitingForModelCache", f"the model is not cached yet ({o.model_cache.message})"
    if o.problems:
        p = o.problems[0]
        return "False", p.reason, f"pod {p.pod}: {p.message}".rstrip(": ")
    if d is not None and d.replicas > 0:
        return "False", "ModelLoading", "engine pods are starting (loading the model)"
    return "False", "NoReadyReplicas", "no engine pod is ready"


def _degraded(o: Observation) -> tuple[str, str, str]:
    if o.spec_problem:
        return "True", o.spec_problem[0], o.spec_problem[1]
    if o.model_cache is not None and o.model_cache.phase == "Failed":
        return "True", "ModelCacheFailed", o.model_cache.message
    if o.problems:
        p = o.problems[0]
        more = f" (and {len(o.problems) - 1} more)" if len(o.problems) > 1 else ""
        return "True", p.reason, f"pod {p.pod}: {p.message}{more}"
    if o.deployment is not None:
        for ctype in ("ReplicaFailure", "Progressing"):
            status, reason, message = o.deployment.conditions.get(ctype, ("", "", ""))
            if (ctype == "ReplicaFailure" and status == "True") or reason == "ProgressDeadlineExceeded":
                return "True", reason or ctype, message
    return "False", "AsExpected", "no problems found"


def compute_conditions(o: Observation, previous: Iterable[Mapping[str, Any]], now: str) -> list[Condition]:
    """Ready, Progressing and Degraded for this observation. A condition whose status did not change
    keeps its previous lastTransitionTime."""
    before = {c.get("type"): c for c in previous}
    out = []
    found = [("Ready", _ready(o)), ("Progressing", _progressing(o)), ("Degraded", _degraded(o))]
    if o.model_cache is not None:
        c = o.model_cache
        found.append(("ModelCached", ("True" if c.ready else "False", c.phase, c.message)))
    for ctype, (status, reason, message) in found:
        prev = before.get(ctype)
        since = prev.get("lastTransitionTime", now) if prev and prev.get("status") == status else now
        out.append(Condition(ctype, status, reason or ctype, message, since, o.generation))
    return out


def status_patch(o: Observation, previous_conditions: Iterable[Mapping[str, Any]], now: str,
                 endpoint: str, selector: str) -> dict[str, Any]:
    """The status fields owned by reconciliation (the autoscaler owns its own fields)."""
    conditions = compute_conditions(o, previous_conditions, now)
    d = o.deployment
    cache = {"modelCache": o.model_cache.status()} if o.model_cache is not None else {}
    return {
        **cache,
        "observedGeneration": o.generation,
        "replicas": d.replicas if d else 0,
        "readyReplicas": d.ready_replicas if d else 0,
        "desiredReplicas": o.desired_replicas,
        "selector": selector,
        "endpoint": endpoint,
        "conditions": [asdict(c) for c in conditions],
    }
