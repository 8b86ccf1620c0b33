"""The router the operator runs in each namespace that has InferenceServices (``FLOTILLA_ROUTER=namespace``): a
Deployment of ``flotilla router --kubernetes --namespace NS`` from the operator's image (no torch), its Service,
and a ServiceAccount whose Role allows exactly what the router calls (``ROUTER_RBAC_RULES``). Every
InferenceService of the namespace owns these objects, so the last one deleted takes the router with it.

With ``FLOTILLA_ROUTER=cluster`` one router serves every namespace instead (``manifests/router/``), and with
``off`` there is none; the InferenceService's ``status.routerURL`` says where it is.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from flotilla.operator.render import API_VERSION, GROUP, KIND

ROUTER_NAME = "flotilla-router"
ROUTER_PORT = 8000
ROUTER_REPLICAS = 2  # the same ring in both: a prefix still lands on one engine, and a router restart loses nothing

#: The calls of ``flotilla.router.kubernetes`` (list the services and their EndpointSlices, wake one through the
#: scale subresource), and nothing more.
ROUTER_RBAC_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (GROUP, "inferenceservices", ("list",)),
    (GROUP, "inferenceservices/scale", ("patch",)),
    ("discovery.k8s.io", "endpointslices", ("list",)),
)

ROUTER_LABELS = {"app.kubernetes.io/name": ROUTER_NAME, "app.kubernetes.io/component": "router",
                 "app.kubernetes.io/part-of": "flotilla"}


def router_url(namespace: str) -> str:
    return f"http://{ROUTER_NAME}.{namespace}.svc:{ROUTER_PORT}/v1"


def rbac_rules(rules: Iterable[tuple[str, str, tuple[str, ...]]] = ROUTER_RBAC_RULES) -> list[dict[str, Any]]:
    return [{"apiGroups": [group], "resources": [resource], "verbs": list(verbs)} for group, resource, verbs in rules]


def _owner_references(owners: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every InferenceService of the namespace, none of them the controller (the objects are shared)."""
    refs = [{"apiVersion": API_VERSION, "kind": KIND, "name": o["metadata"]["name"], "uid": o["metadata"]["uid"],
             "controller": False, "blockOwnerDeletion": False}
            for o in owners if not o["metadata"].get("deletionTimestamp")]
    return sorted(refs, key=lambda r: r["uid"])


def render_router(namespace: str, image: str, owners: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The namespace's router objects, owned by ``owners`` (the namespace's InferenceServices); [] when none is
    left (garbage collection removes the objects)."""
    refs = _owner_references(owners)
    if not refs:
        return []

    def meta() -> dict[str, Any]:
        return {"name": ROUTER_NAME, "namespace": namespace, "labels": dict(ROUTER_LABELS), "ownerReferences": refs}

    container = {
        "name": "router",
        "image": image,
        "command": ["flotilla", "router"],
        "args": ["--kubernetes", "--namespace", namespace, "--host", "0.0.0.0", "--port", str(ROUTER_PORT)],
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 20, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(), "rules": rbac_rules()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ROUTER_NAME},
         "subjects": [{"kind": "ServiceAccount", "name": ROUTER_NAME, "namespace": namespace}]},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(), "spec": {
            "replicas": ROUTER_REPLICAS,
            "selector": {"matchLabels": {"app.kubernetes.io/name": ROUTER_NAME}},
            "template": {"metadata": {"labels": dict(ROUTER_LABELS)}, "spec": {
                "serviceAccountName": ROUTER_NAME,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [container]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta(), "spec": {
            "type": "ClusterIP", "selector": {"app.kubernetes.io/name": ROUTER_NAME},
            "ports": [{"name": "http", "port": ROUTER_PORT, "targetPort": "http", "protocol": "TCP"}]}},
    ]
