"""Condition logic: children's states in, Ready / Progressing / Degraded out (pure functions)."""
from __future__ import annotations

from flotilla.operator.status import (
    DeploymentState, Observation, compute_conditions, pod_problems, status_patch)
from operator_fixtures.oracle import apply_defaults, crd_schema, schema_errors

T0, T1 = "2025-01-01T00:00:00Z", "2025-01-01T00:05:00Z"


def dep(replicas=2, ready=2, updated=2, generation=4, observed=4, **conditions) -> DeploymentState:
    return DeploymentState(generation=generation, observed_generation=observed, replicas=replicas,
                           ready_replicas=ready, updated_replicas=updated, available_replicas=ready,
                           conditions=conditions)


def conds(o: Observation, previous=(), now=T0) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in compute_conditions(o, previous, now)}


def test_all_replicas_ready_and_rolled_out_is_ready_and_stable():
    assert conds(Observation(7, 2, dep())) == {
        "Ready": ("True", "AllReplicasReady"), "Progressing": ("False", "Stable"),
        "Degraded": ("False", "AsExpected")}


def test_no_deployment_yet_is_creating():
    c = conds(Observation(1, 1, None))
    assert c["Ready"] == ("False", "NoReadyReplicas") and c["Progressing"] == ("True", "Creating")


def test_pods_started_but_not_ready_are_loading_the_model():
    c = conds(Observation(1, 1, dep(replicas=1, ready=0, updated=1)))
    assert c["Ready"] == ("False", "ModelLoading")
    assert c["Progressing"] == ("True", "ScalingUp")
    assert c["Degraded"][0] == "False"


def test_one_of_three_ready_still_serves():
    c = conds(Observation(1, 3, dep(replicas=3, ready=1, updated=3)))
    assert c["Ready"] == ("True", "PartiallyReady") and c["Progressing"] == ("True", "ScalingUp")


def test_new_generation_not_yet_observed_by_the_deployment_is_rolling_out():
    c = conds(Observation(2, 2, dep(generation=5, observed=4)))
    assert c["Progressing"] == ("True", "RollingOut") and c["Ready"][0] == "True"


def test_old_pods_still_draining_is_scaling_down():
    assert conds(Observation(1, 2, dep(replicas=3, ready=3)))["Progressing"] == ("True", "ScalingDown")


def test_image_pull_failure_degrades_and_explains_not_ready():
    pod = {"metadata": {"name": "chat-7d9-abc"}, "status": {"containerStatuses": [
        {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image x"}}}]}}
    problems = tuple(pod_problems(pod))
    c = compute_conditions(Observation(1, 1, dep(replicas=1, ready=0), problems), (), T0)
    by = {x.type: x for x in c}
    assert (by["Ready"].status, by["Ready"].reason) == ("False", "ImagePullBackOff")
    assert (by["Degraded"].status, by["Degraded"].reason) == ("True", "ImagePullBackOff")
    assert "chat-7d9-abc" in by["Degraded"].message


def test_unschedulable_pod_is_a_problem_but_a_loading_one_is_not():
    unschedulable = {"metadata": {"name": "p"}, "status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}
    loading = {"metadata": {"name": "q"}, "status": {"containerStatuses": [
        {"state": {"running": {"startedAt": T0}}, "ready": False}]}}
    assert [p.reason for p in pod_problems(unschedulable)] == ["Unschedulable"]
    assert pod_problems(loading) == []


def test_progress_deadline_exceeded_degrades_and_stops_progressing():
    d = dep(ready=1, updated=1, Progressing=("False", "ProgressDeadlineExceeded", "took too long"))
    c = conds(Observation(1, 2, d))
    assert c["Progressing"] == ("False", "ProgressDeadlineExceeded")
    assert c["Degraded"] == ("True", "ProgressDeadlineExceeded")


def test_replica_failure_degrades():
    d = dep(ReplicaFailure=("True", "FailedCreate", "exceeded quota: gpu"))
    assert conds(Observation(1, 2, d))["Degraded"] == ("True", "FailedCreate")


def test_a_spec_that_does_not_fit_is_not_rolled_out_but_the_old_fleet_keeps_serving():
    o = Observation(5, 2, dep(), spec_problem=("DoesNotFit", "weights 141.1 GB + ... > 77.3 GB usable"))
    c = {x.type: x for x in compute_conditions(o, (), T0)}
    assert (c["Ready"].status, c["Ready"].reason) == ("True", "AllReplicasReady")
    assert (c["Progressing"].status, c["Progressing"].reason) == ("False", "DoesNotFit")
    assert (c["Degraded"].status, c["Degraded"].reason) == ("True", "DoesNotFit")
    assert "141.1 GB" in c["Degraded"].message and "generation 5" in c["Progressing"].message


def test_a_spec_that_does_not_fit_with_no_fleet_yet_is_not_ready_for_that_reason():
    c = conds(Observation(1, 1, None, spec_problem=("DoesNotFit", "too big")))
    assert c["Ready"] == ("False", "DoesNotFit")


def test_scaled_to_zero():
    assert conds(Observation(1, 0, dep(replicas=0, ready=0, updated=0)))["Ready"] == ("False", "ScaledToZero")


def test_last_transition_time_changes_only_when_the_status_does():
    first = compute_conditions(Observation(1, 1, dep(replicas=1, ready=0, updated=1)), (), T0)
    previous = [{"type": c.type, "status": c.status, "lastTransitionTime": c.lastTransitionTime} for c in first]
    second = {c.type: c for c in compute_conditions(Observation(1, 1, dep(replicas=1, ready=1, updated=1)),
                                                    previous, T1)}
    assert second["Ready"].lastTransitionTime == T1       # False -> True
    assert second["Degraded"].lastTransitionTime == T0    # False -> False
    assert second["Progressing"].lastTransitionTime == T1  # True -> False


def test_deployment_state_is_read_from_a_deployment_object():
    obj = {"metadata": {"generation": 3}, "status": {
        "observedGeneration": 3, "replicas": 2, "readyReplicas": 1, "updatedReplicas": 2,
        "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]}}
    d = DeploymentState.from_object(obj)
    assert (d.replicas, d.ready_replicas, d.updated_replicas, d.available_replicas) == (2, 1, 2, 0)
    assert d.conditions["Progressing"][1] == "ReplicaSetUpdated"
    assert DeploymentState.from_object({"metadata": {}}).ready_replicas == 0


def test_status_patch_is_valid_against_the_crd_status_schema():
    patch = status_patch(Observation(3, 2, dep()), (), T0, "http://chat.ns.svc:8000/v1",
                         "app.kubernetes.io/name=flotilla-engine,app.kubernetes.io/instance=chat")
    body = {"apiVersion": "flotilla.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "chat"},
            "spec": {"model": {"uri": "org/m"}}, "status": patch}
    assert schema_errors(apply_defaults(crd_schema(), body)) == []
    assert patch["observedGeneration"] == 3 and patch["readyReplicas"] == 2
    assert {c["type"] for c in patch["conditions"]} == {"Ready", "Progressing", "Degraded"}


def test_zero_replicas_is_ready_only_when_a_router_will_start_one():
    """Scaled to zero on purpose (minReplicas 0, a router in front) is Ready: a request will be served (after a
    start). Zero replicas with nothing to wake them is not."""
    idle = dep(replicas=0, ready=0, updated=0)
    assert conds(Observation(1, 0, idle, wakes_on_request=True)) == {
        "Ready": ("True", "ScaledToZero"), "Progressing": ("False", "Stable"), "Degraded": ("False", "AsExpected")}
    assert conds(Observation(1, 0, idle))["Ready"] == ("False", "ScaledToZero")
    # once woken, it is starting like any service
    assert conds(Observation(1, 1, dep(replicas=1, ready=0, updated=1), wakes_on_request=True))["Ready"][0] == "False"
