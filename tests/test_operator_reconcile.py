"""One reconciliation against an in-memory cluster (our own `Cluster` protocol, not an API server):
what gets applied, what is held back, and what status and events say. The kopf wiring on a real API
server is the control-plane issue's test."""
from __future__ import annotations

import copy
import json
from typing import Any, Mapping

from flotilla.operator.cluster import KindNotInstalled, NotFound
from flotilla.operator.reconcile import reconcile
from flotilla.operator.settings import OperatorSettings
from operator_fixtures.oracle import load_yaml_docs, model_config, ROOT, schema_errors

NOW = "2025-01-01T00:00:00Z"
SETTINGS = OperatorSettings(engine_image="registry.local/engine:test", prometheus_address="http://prom:9090",
                            router_mode="off")  # the engine's children alone; the router has its own tests below


class MemoryCluster:
    """Objects keyed by (kind, namespace, name); kinds outside `served` are 'not installed'."""

    def __init__(self, nodes=(), config_maps=None, served=("Service", "Deployment", "PodDisruptionBudget",
                                                             "HorizontalPodAutoscaler"), deployment_status=None,
                 inference_services=()):
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.deleted: list[tuple[str, str]] = []
        self.nodes = list(nodes)
        self.config_maps = config_maps or {}
        self.served = served
        self.deployment_status = deployment_status or {}
        self.services = list(inference_services)

    def inference_services(self, namespace: str) -> list[dict[str, Any]]:
        return [b for b in self.services if b["metadata"]["namespace"] == namespace]

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        if obj["kind"] not in self.served:
            raise KindNotInstalled(f"the cluster does not serve {obj['kind']} ({obj['apiVersion']})")
        stored = copy.deepcopy(dict(obj))
        if obj["kind"] == "Deployment":
            stored["metadata"]["generation"] = 1
            stored["status"] = {"observedGeneration": 1, **self.deployment_status}
        self.objects[(obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])] = stored
        return stored

    def share(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if key not in self.objects:
            self.objects[key] = copy.deepcopy(dict(obj))
        else:
            refs = self.objects[key]["metadata"].setdefault("ownerReferences", [])
            refs += [r for r in obj["metadata"]["ownerReferences"] if r["uid"] not in {x["uid"] for x in refs}]
        return self.objects[key]

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any]:
        try:
            return self.objects[(kind, namespace, name)]
        except KeyError:
            raise NotFound(name) from None

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.deleted.append((kind, name))
        self.objects.pop((kind, namespace, name), None)

    def config_map_json(self, namespace: str, name: str, key: str) -> dict[str, Any]:
        try:
            return json.loads(self.config_maps[name][key])
        except KeyError:
            raise NotFound(f"ConfigMap {name}") from None

    def node_labels(self, node_selector: Mapping[str, str]) -> list[dict[str, str]]:
        return [n for n in self.nodes if all(n.get(k) == v for k, v in node_selector.items())]

    pod_list: list[dict[str, Any]] = []

    def pods(self, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        return [p for p in self.pod_list if all(p["metadata"]["labels"].get(k) == v for k, v in selector.items())]


def body(spec: dict, name: str = "chat") -> dict:
    return {"apiVersion": "flotilla.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": "ns", "uid": "u-1", "generation": 2}, "spec": spec}


def conditions(outcome) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in outcome.status["conditions"]}


H100 = {"nvidia.com/gpu.product": "H100", "nvidia.com/gpu.memory": "81559"}
L4 = {"nvidia.com/gpu.product": "L4", "nvidia.com/gpu.memory": "23034"}


def test_a_fitting_service_gets_its_children_and_a_status():
    cluster = MemoryCluster(nodes=[H100], deployment_status={"replicas": 1, "readyReplicas": 1,
                                                             "updatedReplicas": 1})
    spec = {"model": {"uri": "meta-llama/Llama-3.1-8B-Instruct", "config": model_config("llama-3.1-8b")},
            "engine": {"maxModelLen": 16384}}
    outcome = reconcile(body(spec), cluster, SETTINGS, NOW)
    assert outcome.error is None
    assert {k[0] for k in cluster.objects} == {"Service", "Deployment"}
    assert ("PodDisruptionBudget", "chat") in cluster.deleted
    dep = cluster.objects[("Deployment", "ns", "chat")]
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/engine:test"
    assert outcome.status["endpoint"] == "http://chat.ns.svc:8000/v1"
    assert outcome.status["fit"]["verdict"] == "Fits"
    assert conditions(outcome)["Ready"] == ("True", "AllReplicasReady")
    full = body(spec) | {"status": outcome.status}
    assert schema_errors(full) == []


def test_a_model_that_does_not_fit_is_not_rolled_out_and_status_shows_the_arithmetic():
    cluster = MemoryCluster(nodes=[L4, H100])
    spec = {"model": {"uri": "meta-llama/Llama-3.1-70B-Instruct", "config": model_config("llama-3.1-70b")},
            "engine": {"maxModelLen": 8192}, "nodeSelector": {"nvidia.com/gpu.product": "H100"}}
    outcome = reconcile(body(spec), cluster, SETTINGS, NOW)
    assert cluster.objects == {}
    reason, message, permanent, _ = outcome.error
    assert (reason, permanent) == ("DoesNotFit", True)
    assert outcome.status["fit"]["verdict"] == "DoesNotFit"
    assert "141.1 GB" in outcome.status["fit"]["message"] and "85.5 GB" in outcome.status["fit"]["message"]
    assert conditions(outcome)["Degraded"] == ("True", "DoesNotFit")
    assert [e.reason for e in outcome.events] == ["DoesNotFit"]


def test_the_node_selector_decides_which_gpu_memory_counts():
    spec = {"model": {"uri": "meta-llama/Llama-3.1-8B-Instruct", "config": model_config("llama-3.1-8b")},
            "engine": {"maxModelLen": 65536}}  # 16.1 GB weights + 8.6 GB KV: over an L4's 21.7 GB usable
    on_l4 = reconcile(body(spec | {"nodeSelector": {"nvidia.com/gpu.product": "L4"}}),
                      MemoryCluster(nodes=[L4, H100]), SETTINGS, NOW)
    on_h100 = reconcile(body(spec | {"nodeSelector": {"nvidia.com/gpu.product": "H100"}}),
                        MemoryCluster(nodes=[L4, H100]), SETTINGS, NOW)
    assert on_l4.status["fit"]["verdict"] == "DoesNotFit"
    assert on_h100.status["fit"]["verdict"] == "Fits"


def test_a_tight_fit_rolls_out_with_a_warning_event():
    spec = {"model": {"uri": "meta-llama/Llama-3.1-8B-Instruct", "config": model_config("llama-3.1-8b")},
            "engine": {"maxModelLen": 8192, "gpuMemoryUtilization": 0.95}, "resources": {"gpuMemoryBytes": "18Gi"}}
    cluster = MemoryCluster()
    outcome = reconcile(body(spec), cluster, SETTINGS, NOW)
    assert outcome.error is None and ("Deployment", "ns", "chat") in cluster.objects
    assert [(e.type, e.reason) for e in outcome.events] == [("Warning", "TightFit")]


def test_config_from_a_configmap_feeds_the_fit_check_and_a_missing_one_is_retried():
    sample = {d["kind"]: d for d in load_yaml_docs(ROOT / "manifests/samples/llama-70b-tp4.yaml")}
    cm = {"llama-70b-config": sample["ConfigMap"]["data"]}
    spec = sample["InferenceService"]["spec"]
    ok = reconcile(body(spec, "llama-70b"), MemoryCluster(
        nodes=[{**H100, "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}], config_maps=cm), SETTINGS, NOW)
    assert ok.error is None and ok.status["fit"]["verdict"] == "Fits"
    missing = reconcile(body(spec, "llama-70b"), MemoryCluster(), SETTINGS, NOW)
    reason, _, permanent, delay = missing.error
    assert (reason, permanent) == ("ConfigMissing", False) and delay > 0
    assert conditions(missing)["Ready"] == ("False", "ConfigMissing")


def test_keda_mode_without_keda_installed_says_so_and_retries():
    spec = {"model": {"uri": "org/m"}, "resources": {"gpus": 0},
            "autoscaling": {"enabled": True, "mode": "keda"}}
    outcome = reconcile(body(spec), MemoryCluster(), SETTINGS, NOW)
    reason, message, permanent, _ = outcome.error
    assert reason == "KindNotInstalled" and not permanent and "ScaledObject" in message
    assert conditions(outcome)["Degraded"] == ("True", "KindNotInstalled")


def test_an_invalid_spec_lands_in_status_as_a_permanent_error():
    outcome = reconcile(body({"model": {"uri": "org/m"}, "engine": {"tensorParallelSize": 4},
                              "resources": {"gpus": 2}}), MemoryCluster(), SETTINGS, NOW)
    reason, message, permanent, _ = outcome.error
    assert (reason, permanent) == ("InvalidSpec", True) and "tensorParallelSize" in message
    assert conditions(outcome)["Degraded"] == ("True", "InvalidSpec")


def test_reconcile_is_idempotent():
    cluster = MemoryCluster(nodes=[H100])
    spec = {"model": {"uri": "org/m-1B"}, "replicas": 3}
    first = reconcile(body(spec), cluster, SETTINGS, NOW)
    snapshot = copy.deepcopy(cluster.objects)
    second = reconcile(body(spec), cluster, SETTINGS, NOW)
    assert cluster.objects == snapshot and first.status == second.status
    assert ("PodDisruptionBudget", "ns", "chat") in cluster.objects


# --- the shared model cache ---------------------------------------------------------------------------------

CACHED = {"model": {"uri": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "resources": {"gpus": 0, "cpu": "1"},
          "modelCache": {"claimName": "models"}}


def loader_jobs(cluster: MemoryCluster) -> list[dict[str, Any]]:
    return [o for (kind, _, _), o in cluster.objects.items() if kind == "Job"]


def test_engine_pods_wait_for_one_loader_job_that_two_services_share():
    cluster = MemoryCluster()
    first = reconcile(body(CACHED, "a"), cluster, SETTINGS, NOW)
    second_body = body(CACHED, "b")
    second_body["metadata"]["uid"] = "u-2"
    second = reconcile(second_body, cluster, SETTINGS, NOW)
    [job] = loader_jobs(cluster)
    assert [r["uid"] for r in job["metadata"]["ownerReferences"]] == ["u-1", "u-2"]
    for outcome in (first, second):
        assert outcome.error is None
        assert conditions(outcome)["ModelCached"] == ("False", "Pending")
        assert conditions(outcome)["Progressing"] == ("True", "WaitingForModelCache")
        assert conditions(outcome)["Ready"] == ("False", "WaitingForModelCache")
        assert outcome.status["modelCache"] == {"job": job["metadata"]["name"], "phase": "Pending"}
    assert ("Deployment", "ns", "a") not in cluster.objects and ("Service", "ns", "a") in cluster.objects
    # the Job completes: the next reconciliation rolls the engines out
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "startTime": "2025-01-01T00:00:00Z",
                     "completionTime": "2025-01-01T00:02:00Z", "succeeded": 1}
    done = reconcile(body(CACHED, "a"), cluster, SETTINGS, NOW)
    assert conditions(done)["ModelCached"] == ("True", "Ready")
    assert done.status["modelCache"]["seconds"] == 120
    assert ("Deployment", "ns", "a") in cluster.objects


def test_a_running_fleet_keeps_serving_while_a_new_model_is_cached():
    cluster = MemoryCluster(deployment_status={"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1})
    reconcile(body({k: v for k, v in CACHED.items() if k != "modelCache"}), cluster, SETTINGS, NOW)
    before = copy.deepcopy(cluster.objects[("Deployment", "ns", "chat")])
    outcome = reconcile(body({**CACHED, "model": {"uri": "org/next-model"}}), cluster, SETTINGS, NOW)
    assert cluster.objects[("Deployment", "ns", "chat")] == before  # untouched until the cache is ready
    assert conditions(outcome)["Ready"] == ("True", "AllReplicasReady")
    assert conditions(outcome)["Progressing"] == ("True", "WaitingForModelCache")


def test_a_job_that_failed_for_good_degrades_the_service_and_is_replaced_later():
    cluster = MemoryCluster()
    reconcile(body(CACHED), cluster, SETTINGS, NOW)
    [job] = loader_jobs(cluster)
    name = job["metadata"]["name"]
    job["status"] = {"failed": 5, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                  "lastTransitionTime": NOW}]}
    cluster.pod_list = [{"metadata": {"labels": {"flotilla.dev/model-loader": name},
                                      "creationTimestamp": "2025-01-01T00:00:00Z"},
                         "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {
                             "message": json.dumps({"error": "model: repo x was not found"})}}}]}}]
    failed = reconcile(body(CACHED), cluster, SETTINGS, NOW)
    assert conditions(failed)["Degraded"] == ("True", "ModelCacheFailed")
    assert "repo x was not found" in failed.status["conditions"][2]["message"]
    assert any(e.reason == "ModelCacheFailed" for e in failed.events) and ("Job", name) not in cluster.deleted
    later = reconcile(body(CACHED), cluster, SETTINGS, "2025-01-01T00:05:00Z")
    assert ("Job", name) in cluster.deleted and "status" not in loader_jobs(cluster)[0]  # a fresh Job
    assert conditions(later)["ModelCached"] == ("False", "Pending")


ROUTER_KINDS = ("Service", "Deployment", "PodDisruptionBudget", "ServiceAccount", "Role", "RoleBinding")


def test_the_namespace_router_is_owned_by_every_service_of_the_namespace_and_named_in_status():
    from flotilla.operator.router_objects import ROUTER_NAME

    settings = OperatorSettings(engine_image="e", router_mode="namespace", router_image="registry.local/op:1")
    spec = {"model": {"uri": "/models/tiny"}, "resources": {"gpus": 0}}
    chat, code = body(spec, "chat"), body(spec, "code")
    code["metadata"]["uid"] = "u-2"
    cluster = MemoryCluster(served=ROUTER_KINDS, inference_services=[chat, code])
    outcome = reconcile(chat, cluster, settings, NOW)
    assert outcome.error is None and outcome.status["routerURL"] == "http://flotilla-router.ns.svc:8000/v1"
    for kind in ("ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"):
        obj = cluster.objects[(kind, "ns", ROUTER_NAME)]
        assert [r["uid"] for r in obj["metadata"]["ownerReferences"]] == ["u-1", "u-2"], kind
        assert not any(r["controller"] for r in obj["metadata"]["ownerReferences"])
    dep = cluster.objects[("Deployment", "ns", ROUTER_NAME)]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "registry.local/op:1" and c["command"] == ["flotilla", "router"]
    assert c["args"][:3] == ["--kubernetes", "--namespace", "ns"]
    assert schema_errors(chat | {"status": outcome.status}) == []
    # a service being deleted no longer owns it
    code["metadata"]["deletionTimestamp"] = NOW
    reconcile(chat, cluster, settings, NOW)
    assert [r["uid"] for r in cluster.objects[("Deployment", "ns", ROUTER_NAME)]["metadata"]["ownerReferences"]] \
        == ["u-1"]


def test_a_cluster_router_is_named_in_status_and_nothing_is_rendered_for_it():
    settings = OperatorSettings(engine_image="e", router_mode="cluster",
                                router_url="http://flotilla-router.flotilla-system.svc:8000/v1")
    cluster = MemoryCluster(served=ROUTER_KINDS)
    outcome = reconcile(body({"model": {"uri": "/models/tiny"}, "resources": {"gpus": 0}}), cluster, settings, NOW)
    assert outcome.status["routerURL"] == "http://flotilla-router.flotilla-system.svc:8000/v1"
    assert {k[0] for k in cluster.objects} == {"Service", "Deployment"}


def test_a_service_scaled_to_zero_behind_a_router_is_ready_with_no_engine_pod():
    spec = {"model": {"uri": "/models/tiny"}, "resources": {"gpus": 0}, "replicas": 0,
            "autoscaling": {"enabled": True, "minReplicas": 0}}
    for mode, ready in (("namespace", "True"), ("off", "False")):
        cluster = MemoryCluster(served=ROUTER_KINDS, inference_services=[body(spec)])
        outcome = reconcile(body(spec), cluster, OperatorSettings(engine_image="e", router_mode=mode), NOW)
        assert cluster.objects[("Deployment", "ns", "chat")]["spec"]["replicas"] == 0
        assert conditions(outcome)["Ready"] == (ready, "ScaledToZero"), mode
