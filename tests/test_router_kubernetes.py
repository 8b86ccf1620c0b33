"""The router's Kubernetes backends against a real API server (the test control plane): the models and their
replicas come from InferenceServices and EndpointSlices (here written by the test, standing in for the operator,
kubelet and the EndpointSlice controller, and pointing at a real engine process on loopback), and a request for a
service scaled to zero sets spec.replicas to 1 through the scale subresource, is held, and completes once the
replica's endpoint is ready."""

from __future__ import annotations

import threading

import httpx
import pytest

from controlplane import ControlPlane, control_plane, wait_for  # noqa: F401  (fixture)
from flotilla.router.app import RouterConfig
from flotilla.router.kubernetes import KubernetesBackends
from test_controlplane_operator import PLURAL, Kube, cpu_service, kube_with_namespace
from server_process import host_address
from test_router import KEY, RunningRouter, chat, engine_metric, start_engine
from flotilla.operator.render import GROUP, VERSION

pytestmark = pytest.mark.controlplane
NS = "flotilla-router"


@pytest.fixture(scope="module")
def kube(control_plane: ControlPlane) -> Kube:  # noqa: F811
    return kube_with_namespace(control_plane, NS)


def service(name: str, model: str, replicas: int) -> dict:
    body = cpu_service(name, replicas=replicas)
    body["metadata"]["namespace"] = NS
    body["spec"]["model"]["servedModelName"] = model
    return body


def endpoint_slice(service_name: str, port: int, ready: bool, address: str) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"generateName": f"{service_name}-", "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": ready}}]}


def models(router: RunningRouter) -> dict[str, int]:
    r = httpx.get(f"{router.base}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    return {m["id"]: m["ready_replicas"] for m in r.json()["data"]}


def test_a_service_scaled_to_zero_is_woken_through_its_scale_subresource(kube, control_plane, tiny_llama):  # noqa: F811
    custom = kube.custom
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, service("chat", "tiny", 0))
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, service("other", "other-model", 1))
    discovery = kube.k.DiscoveryV1Api(kube.client)
    discovery.create_namespaced_endpoint_slice(NS, endpoint_slice("other", 1, ready=False, address=host_address()))  # a pod still loading
    router = RunningRouter(KubernetesBackends(NS, interval=1.0, api_client=control_plane.api_client()),
                           RouterConfig(api_key=KEY))
    engine = None
    try:
        assert models(router) == {"tiny": 0, "other-model": 0}
        answers: list = []
        waiting = threading.Thread(target=lambda: answers.append(chat(router.client(), "A", "wake up")))
        waiting.start()
        wait_for(lambda: custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "chat")["spec"]["replicas"]
                 == 1, what="the router to ask for a replica (spec.replicas 1)")
        assert not answers  # held, not refused
        engine = start_engine(tiny_llama, host=host_address()).wait_ready()  # as a pod's IP would be
        discovery.create_namespaced_endpoint_slice(NS, endpoint_slice("chat", engine.port, True, engine.host))
        waiting.join(120)
        assert answers and answers[0].choices[0].finish_reason == "length"
        assert engine_metric(engine, "vllm:request_success_total") == 1
        assert router.metric("flotilla_router_hold_seconds_count") == 1
        assert models(router)["tiny"] == 1
        # a service deleted is a model gone
        custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "other")
        wait_for(lambda: "other-model" not in models(router), what="the deleted service's model to leave /v1/models")
    finally:
        router.close()
        if engine is not None:
            engine.stop()
