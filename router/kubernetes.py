"""The router's table from the cluster: every InferenceService (in one namespace, or all) is a model, named as its
engines serve it, and its replicas are the ready endpoints of its Service's EndpointSlices, which Kubernetes keeps
to the pods that pass their readiness probe. A model with none is woken through the InferenceService's scale
subresource (``spec.replicas`` 0 -> 1, what ``kubectl scale`` does); the operator starts the pod.

The table is re-read every ``interval`` seconds, and every half second while requests are held (so a held request
goes on within half a second of its replica becoming ready).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from flotilla.operator.cluster import PLURAL
from flotilla.operator.render import GROUP, VERSION
from flotilla.router.backends import Backends

logger = logging.getLogger("flotilla.router.kubernetes")

SERVICE_LABEL = "kubernetes.io/service-name"
FAST_INTERVAL = 0.5


def _ready_urls(slices: list[dict[str, Any]]) -> list[str]:
    """Base URLs of the ready endpoints of a Service's EndpointSlices (port ``http``, else the first)."""
    urls = []
    for s in slices:
        ports = s.get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == "http"), ports[0].get("port") if ports else None)
        if port is None:
            continue
        for endpoint in s.get("endpoints") or ():
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for address in endpoint.get("addresses") or ():
                host = f"[{address}]" if ":" in address else address
                urls.append(f"http://{host}:{port}")
    return sorted(set(urls))


def table_from(services: list[dict[str, Any]], slices: list[dict[str, Any]]) -> tuple[
        dict[str, list[str]], dict[str, list[tuple[str, str, int]]]]:
    """(model -> ready replica URLs, model -> [(namespace, name, spec.replicas)]) from the listed objects. A
    service whose spec the operator cannot read is not routed to (its status says why)."""
    from flotilla.operator.spec import SpecError, parse_service

    by_service: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in slices:
        meta = s.get("metadata") or {}
        name = (meta.get("labels") or {}).get(SERVICE_LABEL)
        if name:
            by_service.setdefault((meta.get("namespace", ""), name), []).append(s)
    table: dict[str, list[str]] = {}
    owners: dict[str, list[tuple[str, str, int]]] = {}
    for body in services:
        try:
            svc = parse_service(body, default_image="-")
        except SpecError:
            continue
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            continue
        urls = _ready_urls(by_service.get((svc.namespace, svc.name), []))
        for model in (svc.served_model_name, *(a.name for a in svc.adapters)):  # an adapter is served by its base's
            table.setdefault(model, []).extend(urls)                               # engines
            owners.setdefault(model, []).append((svc.namespace, svc.name, svc.replicas))
    return table, owners


class KubernetesBackends(Backends):
    def __init__(self, namespace: str | None = None, interval: float = 5.0, api_client: Any = None) -> None:
        super().__init__()
        self.namespace = namespace
        self.interval = interval
        self._api_client = api_client
        self._owners: dict[str, list[tuple[str, str, int]]] = {}
        self._task: asyncio.Task | None = None
        self._fast_until = 0.0
        self._woken = asyncio.Event()

    def _apis(self) -> tuple[Any, Any, Any]:
        import kubernetes

        if self._api_client is None:
            try:
                kubernetes.config.load_incluster_config()
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config()
            self._api_client = kubernetes.client.ApiClient()
        c = self._api_client
        return kubernetes.client.CustomObjectsApi(c), kubernetes.client.DiscoveryV1Api(c), c

    def refresh(self) -> None:
        """Read the cluster once and replace the table (blocking: run it in a thread)."""
        custom, discovery, client = self._apis()
        if self.namespace:
            services = custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)["items"]
            slices = discovery.list_namespaced_endpoint_slice(self.namespace, label_selector=SERVICE_LABEL).items
        else:
            services = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
            slices = discovery.list_endpoint_slice_for_all_namespaces(label_selector=SERVICE_LABEL).items
        table, owners = table_from(services, [client.sanitize_for_serialization(s) for s in slices])
        self._owners = owners
        for model in set(self.models()) - set(table):
            self.set_replicas(model, None)
        for model, urls in table.items():
            if tuple(sorted(set(urls))) != self.replicas(model):
                self.set_replicas(model, sorted(set(urls)))

    async def start(self) -> None:
        await super().start()
        await asyncio.to_thread(self.refresh)  # serve with a table, not an empty one
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            fast = loop.time() < self._fast_until
            try:
                await asyncio.wait_for(self._woken.wait(), FAST_INTERVAL if fast else self.interval)
            except asyncio.TimeoutError:
                pass
            self._woken.clear()
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as e:  # noqa: BLE001 - the API server may be briefly away; keep the last table
                logger.warning("reading InferenceServices and EndpointSlices failed: %s", e)

    async def wake(self, model: str) -> None:
        """Ask for one replica of each service serving ``model`` that has none, then watch closely."""
        self._fast_until = asyncio.get_running_loop().time() + 600
        custom, _, _ = self._apis()
        for namespace, name, replicas in self._owners.get(model, []):
            if replicas == 0:
                logger.info("waking %s/%s for %s", namespace, name, model)
                await asyncio.to_thread(custom.patch_namespaced_custom_object_scale, GROUP, VERSION, namespace,
                                        PLURAL, name, {"spec": {"replicas": 1}})
        self._woken.set()
