"""Every call the operator makes to the Kubernetes API, in one place (and so, one RBAC list).

`reconcile.py` talks to the `Cluster` protocol; `KubeCluster` implements it with the official client.
Objects go in and come out as plain dicts, so nothing above this module sees client model classes.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Mapping, Protocol, Sequence

from flotilla.operator.render import GROUP, VERSION

PLURAL = "inferenceservices"
FIELD_MANAGER = "flotilla"

#: The permissions the calls below need, and nothing more; manifests/rbac.yaml grants exactly these
#: (a test compares the two). kopf itself needs the CRD, namespace, event and peering rules.
RBAC_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (GROUP, "inferenceservices", ("get", "list", "watch", "patch")),
    (GROUP, "inferenceservices/status", ("get", "patch")),
    (GROUP, "inferenceservices/scale", ("get", "patch")),
    # create beside patch: a server-side apply that creates the object is authorized as both
    ("apps", "deployments", ("get", "list", "watch", "patch", "create")),
    ("", "services", ("get", "list", "watch", "patch", "create")),
    ("policy", "poddisruptionbudgets", ("get", "patch", "create", "delete")),
    ("autoscaling", "horizontalpodautoscalers", ("get", "patch", "create", "delete")),
    ("keda.sh", "scaledobjects", ("get", "patch", "create", "delete")),
    # the shared model cache's loader Jobs (model_cache.py): created once, owners added, failed ones replaced
    ("batch", "jobs", ("get", "list", "watch", "create", "patch", "delete")),
    ("", "pods", ("get", "list", "watch")),
    # LoRA engines' readiness gate, opened once spec.adapters are loaded into the pod (adapters.py)
    ("", "pods/status", ("patch",)),
    # the namespace's router (router_objects.py): its account, and a Role holding what the router calls (which the
    # operator must hold itself to grant)
    ("", "serviceaccounts", ("get", "patch", "create")),
    ("rbac.authorization.k8s.io", "roles", ("get", "patch", "create")),
    ("rbac.authorization.k8s.io", "rolebindings", ("get", "patch", "create")),
    ("discovery.k8s.io", "endpointslices", ("list",)),
    ("", "configmaps", ("get",)),
    ("", "nodes", ("list",)),
    ("", "events", ("create", "patch")),
    ("events.k8s.io", "events", ("create", "patch")),
    ("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch")),
    ("", "namespaces", ("list", "watch")),
    # create: the operator makes its own peering object at startup (handlers.ensure_peering)
    ("kopf.dev", "clusterkopfpeerings", ("get", "list", "watch", "patch", "create")),
    ("kopf.dev", "kopfpeerings", ("get", "list", "watch", "patch", "create")),
)


def peering_objects(name: str, namespaces: Sequence[str]) -> list[dict[str, Any]]:
    """The kopf peering objects replicas named `name` meet in: one ClusterKopfPeering when they watch
    every namespace, else one KopfPeering in each watched namespace."""
    meta = {"name": name, "labels": {"app.kubernetes.io/part-of": "flotilla"}}
    if not namespaces:
        return [{"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": meta}]
    return [{"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {**meta, "namespace": ns}}
            for ns in namespaces]


class KindNotInstalled(Exception):
    """The cluster does not serve this kind (KEDA or prometheus-adapter missing, for instance)."""


class NotFound(Exception):
    pass


class ApiError(Exception):
    """The API server refused a request. `permanent` when retrying the same request cannot help."""

    def __init__(self, message: str, permanent: bool, status: int = 0) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.status = status


class Cluster(Protocol):
    """What reconciliation needs from the API server."""

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...
    def share(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...
    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any]: ...
    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None: ...
    def config_map_json(self, namespace: str, name: str, key: str) -> dict[str, Any]: ...
    def node_labels(self, node_selector: Mapping[str, str]) -> list[dict[str, str]]: ...
    def pods(self, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]: ...
    def inference_services(self, namespace: str) -> list[dict[str, Any]]: ...
    def set_pod_condition(self, namespace: str, pod: str, condition: Mapping[str, Any]) -> None: ...


def label_selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class KubeCluster:
    """`Cluster` on the official kubernetes client (in-cluster config, or kubeconfig when outside)."""

    def __init__(self) -> None:
        import kubernetes
        from kubernetes.dynamic import DynamicClient

        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        self._api = kubernetes.client.ApiClient()
        self._core = kubernetes.client.CoreV1Api(self._api)
        self._custom = kubernetes.client.CustomObjectsApi(self._api)
        self._dynamic = DynamicClient(self._api)
        self._discovery_lock = threading.Lock()

    def _resource(self, api_version: str, kind: str) -> Any:
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        try:
            # The dynamic client's discovery cache is not thread-safe (a miss, such as an uninstalled
            # KEDA, rebuilds it in place), and kopf runs sync handlers on a thread pool.
            with self._discovery_lock:
                return self._dynamic.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            raise KindNotInstalled(f"the cluster does not serve {kind} ({api_version})") from None

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.dynamic.exceptions import DynamicApiError

        try:
            return fn(*args, **kwargs)
        except (ApiException, DynamicApiError) as e:
            status = getattr(e, "status", 0) or 0
            if status == 404:
                raise NotFound(str(e)) from None
            # 409 (conflict), 429 and 5xx pass; 400/403/422 repeat until the spec or RBAC changes.
            raise ApiError(f"{status} {getattr(e, 'reason', '')}: {_api_message(e)}",
                           permanent=status in (400, 403, 422), status=status) from None

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply as field manager `flotilla`: the operator owns the fields it renders and
        nothing else, so others (HPA, admission webhooks, kubectl annotate) can own the rest."""
        resource = self._resource(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        result = self._call(self._dynamic.server_side_apply, resource, body=dict(obj), name=meta["name"],
                            namespace=meta.get("namespace"), field_manager=FIELD_MANAGER,
                            force_conflicts=True)
        return result.to_dict()

    def share(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """An object several InferenceServices share (a loader Job): created from `obj` when missing; when it
        exists, only `obj`'s owner reference is added to it (strategic merge keyed by uid keeps the others),
        and nothing else is changed, as the first creator's spec is the one that runs."""
        resource = self._resource(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        try:
            return self._call(resource.create, body=dict(obj), namespace=meta.get("namespace")).to_dict()
        except ApiError as e:
            if e.status != 409:  # 409: it exists already
                raise
        current = self._call(resource.get, name=meta["name"], namespace=meta.get("namespace")).to_dict()
        have = {r.get("uid") for r in current["metadata"].get("ownerReferences") or ()}
        missing = [r for r in meta.get("ownerReferences") or () if r["uid"] not in have]
        if not missing:
            return current
        return self._call(resource.patch, body={"metadata": {"ownerReferences": missing}}, name=meta["name"],
                          namespace=meta.get("namespace"),
                          content_type="application/strategic-merge-patch+json").to_dict()

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any]:
        resource = self._resource(api_version, kind)
        return self._call(resource.get, name=name, namespace=namespace).to_dict()

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            resource = self._resource(api_version, kind)
            # Background: dependents (a Job's pods) go too; a Job's own default would orphan them.
            self._call(resource.delete, name=name, namespace=namespace,
                       body={"propagationPolicy": "Background"})
        except (KindNotInstalled, NotFound):
            pass  # nothing to delete

    def config_map_json(self, namespace: str, name: str, key: str) -> dict[str, Any]:
        cm = self._call(self._core.read_namespaced_config_map, name, namespace)
        data = (cm.data or {}).get(key)
        if data is None:
            raise NotFound(f"ConfigMap {name} has no key {key!r}")
        return json.loads(data)

    def node_labels(self, node_selector: Mapping[str, str]) -> list[dict[str, str]]:
        nodes = self._call(self._core.list_node, label_selector=label_selector(node_selector) or None)
        return [dict(n.metadata.labels or {}) for n in nodes.items]

    def pods(self, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        pods = self._call(self._core.list_namespaced_pod, namespace, label_selector=label_selector(selector))
        return [self._api.sanitize_for_serialization(p) for p in pods.items]

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        """Set replicas through the scale subresource, exactly as `kubectl scale` and the HPA do."""
        self._call(self._custom.patch_namespaced_custom_object_scale, GROUP, VERSION, namespace, PLURAL, name,
                   {"spec": {"replicas": replicas}})

    def set_pod_condition(self, namespace: str, pod: str, condition: Mapping[str, Any]) -> None:
        """Set one condition in a pod's status (a readiness gate's); the others are left as the kubelet wrote
        them (conditions merge by type)."""
        self._call(self._core.patch_namespaced_pod_status, pod, namespace,
                   {"status": {"conditions": [dict(condition)]}},
                   _content_type="application/strategic-merge-patch+json")

    def inference_services(self, namespace: str) -> list[dict[str, Any]]:
        return self._call(self._custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)["items"]

    def get_service(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call(self._custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self._call(self._custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace, PLURAL, name,
                   {"status": dict(status)})


def _api_message(e: Exception) -> str:
    body = getattr(e, "body", None)
    try:
        return json.loads(body).get("message", str(body)) if body else str(e)
    except (TypeError, ValueError):
        return str(body)
