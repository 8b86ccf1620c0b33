"""InferenceService -> the Kubernetes objects that realise it. Pure functions: no API calls, no clock.

Everything the operator decides about a pod (flags, GPUs, /dev/shm, probes, draining, security) is
decided here, so it is all testable without an API server; handlers only apply what this returns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from flotilla.operator import model_cache
from flotilla.operator.fit import startup_budget_seconds
from flotilla.operator.quantity import format_bytes, quantity_bytes
from flotilla.operator.spec import InferenceService

GROUP = "flotilla.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
PORT = 8000
MANAGED_BY = "flotilla-operator"

#: Seconds between the pod being marked for deletion and SIGTERM. Endpoint removal is asynchronous:
#: kube-proxy and ingress controllers need a few seconds to stop sending new requests to the pod.
PRESTOP_SLEEP_SECONDS = 10
STARTUP_PERIOD_SECONDS = 10

GiB = 2**30
# NCCL places its intra-node transport buffers in /dev/shm and needs more with every extra rank;
# Docker's 64 MiB default makes multi-GPU engines hang at the first all-reduce.
SHM_SINGLE_GPU_BYTES = 1 * GiB
SHM_PER_TP_RANK_BYTES = 4 * GiB

CACHE_MOUNT = "/cache"
#: Keys of spec.model.credentialsSecretRef the engine reads: the hub's token, and S3's usual variables.
CREDENTIAL_KEYS = ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                   "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
MODELS_MOUNT = "/models"


# The pod condition the operator sets once a pod has spec.adapters loaded (a readiness gate of LoRA engines).
ADAPTERS_CONDITION = f"{GROUP}/adapters-loaded"


def selector_labels(svc: InferenceService) -> dict[str, str]:
    """Labels that select this service's pods; immutable on a Deployment, so never extend them."""
    return {"app.kubernetes.io/name": "flotilla-engine", "app.kubernetes.io/instance": svc.name}


def labels(svc: InferenceService) -> dict[str, str]:
    return {
        **selector_labels(svc),
        "app.kubernetes.io/component": "engine",
        "app.kubernetes.io/part-of": "flotilla",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def owner_reference(svc: InferenceService, controller: bool = True) -> dict[str, Any]:
    """Children are garbage-collected with their InferenceService. A shared object (the loader Job) has one
    non-controller reference per InferenceService and goes with the last of them."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": svc.name, "uid": svc.uid,
            "controller": controller, "blockOwnerDeletion": controller}


def _metadata(svc: InferenceService) -> dict[str, Any]:
    return {"name": svc.name, "namespace": svc.namespace, "labels": labels(svc),
            "ownerReferences": [owner_reference(svc)]}


def shm_size_bytes(svc: InferenceService) -> int:
    """The spec's shmSize, else sized from tensorParallelSize."""
    if svc.shm_size_bytes is not None:
        return svc.shm_size_bytes
    tp = svc.engine.tensor_parallel_size
    return SHM_SINGLE_GPU_BYTES if tp == 1 else SHM_PER_TP_RANK_BYTES * tp


def model_path(svc: InferenceService) -> str:
    """What the engine is told to load: hub ids and image paths as given, PVC paths where mounted."""
    if svc.model.source == "pvc":
        claim, path = svc.model.pvc_claim_and_path
        return f"{MODELS_MOUNT}/{claim}/{path}".rstrip("/")
    return svc.model.uri


def engine_args(svc: InferenceService) -> list[str]:
    """`flotilla serve` arguments; flag names are vLLM's."""
    e = svc.engine
    args = ["serve", model_path(svc), "--host", "0.0.0.0", "--port", str(PORT),
            "--served-model-name", svc.served_model_name]
    if svc.model.tokenizer:
        args += ["--tokenizer", svc.model.tokenizer]
    if svc.model.revision:
        args += ["--revision", svc.model.revision]
    if e.max_model_len is not None:
        args += ["--max-model-len", str(e.max_model_len)]
    args += ["--max-num-seqs", str(e.max_num_seqs)]
    if e.max_num_batched_tokens is not None:
        args += ["--max-num-batched-tokens", str(e.max_num_batched_tokens)]
    args += ["--gpu-memory-utilization", f"{e.gpu_memory_utilization:g}",
             "--block-size", str(e.block_size),
             "--enable-prefix-caching" if e.enable_prefix_caching else "--no-enable-prefix-caching",
             "--enable-chunked-prefill" if e.enable_chunked_prefill else "--no-enable-chunked-prefill"]
    args += ["--kv-cache-dtype", e.kv_cache_dtype, "--dtype", e.dtype]
    if e.quantization:
        args += ["--quantization", e.quantization]
    args += ["--tensor-parallel-size", str(e.tensor_parallel_size)]
    if svc.lora is not None:  # the adapters themselves are loaded at run time (adapters.py): no restart per change
        args += ["--enable-lora", "--max-loras", str(svc.lora.max_loras), "--max-lora-rank", str(svc.lora.max_lora_rank)]
        if svc.lora.max_cpu_loras is not None:
            args += ["--max-cpu-loras", str(svc.lora.max_cpu_loras)]
    return args + list(e.extra_args)


def _resources(svc: InferenceService, shm: int) -> dict[str, Any]:
    r = svc.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if r.cpu:
        requests["cpu"] = r.cpu
    if r.memory:
        requests["memory"] = r.memory
        # Pages written to a memory-backed emptyDir are charged to the pod's memory cgroup; without
        # this headroom a busy NCCL ring gets the engine OOM-killed at the memory limit.
        limits["memory"] = format_bytes(quantity_bytes(r.memory) + shm)
    if r.gpus:
        # Extended resources need limits; requests must equal them when given.
        limits[r.gpu_resource_name] = str(r.gpus)
        requests[r.gpu_resource_name] = str(r.gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _credentials_env(svc: InferenceService) -> list[dict[str, Any]]:
    """Each key the credentials Secret has becomes the variable the hub or S3 client reads (missing keys are
    skipped); from the Secret, never in args: args show up in `kubectl describe` and `ps`."""
    if not svc.model.credentials_secret_ref:
        return []
    return [{"name": key, "valueFrom": {"secretKeyRef": {
        "name": svc.model.credentials_secret_ref, "key": key, "optional": True}}} for key in CREDENTIAL_KEYS]


def _shared_cache_env(offline: bool) -> list[dict[str, Any]]:
    """The claim's layout: the hub's cache and Flotilla's own (S3 downloads, GGUF conversions)."""
    env = [{"name": "HF_HUB_CACHE", "value": model_cache.HUB_CACHE},
           {"name": "FLOTILLA_CACHE", "value": model_cache.FLOTILLA_CACHE}]
    return env + ([{"name": "HF_HUB_OFFLINE", "value": "1"}] if offline else [])


def _env(svc: InferenceService) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # Read-only root filesystem: everything that caches (HF hub, Triton, torch) goes under /cache.
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_MOUNT}/triton"},
    ]
    if svc.model_cache:
        # The weights are in the shared claim already (the loader Job put them there, or the user did): read
        # them from there and never reach for the network.
        env += _shared_cache_env(offline=True)
    else:
        env.append({"name": "FLOTILLA_CACHE", "value": f"{CACHE_MOUNT}/flotilla"})
    if svc.api_key_secret_ref:
        ref = svc.api_key_secret_ref
        env.append({"name": "FLOTILLA_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if svc.lora is not None:  # the operator loads and unloads spec.adapters through the engine's endpoints
        env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "true"})
    return env + _credentials_env(svc) + [dict(e) for e in svc.env]


def _volumes(svc: InferenceService, shm: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": format_bytes(shm)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_MOUNT},
    ]
    volumes.append({"name": "cache", "emptyDir": {}})
    if svc.model_cache:
        volumes.append({"name": "model-cache", "persistentVolumeClaim": {
            "claimName": svc.model_cache.claim_name, "readOnly": True}})
        mounts.append({"name": "model-cache", "mountPath": model_cache.MOUNT, "readOnly": True})
    if svc.model.source == "pvc":
        claim, _ = svc.model.pvc_claim_and_path
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": f"{MODELS_MOUNT}/{claim}", "readOnly": True})
    return volumes, mounts


def _probes(svc: InferenceService, config: Mapping[str, Any] | None) -> dict[str, Any]:
    def http(period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
        return {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": period,
                "timeoutSeconds": timeout, "failureThreshold": failures}

    budget = startup_budget_seconds(svc, config)
    return {
        # Liveness and readiness do not run until this succeeds, so a slow load is never killed.
        "startupProbe": http(STARTUP_PERIOD_SECONDS, math.ceil(budget / STARTUP_PERIOD_SECONDS)),
        # 503 while draining takes the pod out of the Service fast.
        "readinessProbe": http(5, 2),
        "livenessProbe": http(15, 4),
    }


def render_deployment(svc: InferenceService, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The engine Deployment. `config` is the model's config.json when known (probe budget)."""
    shm = shm_size_bytes(svc)
    volumes, mounts = _volumes(svc, shm)
    container: dict[str, Any] = {
        "name": "engine",
        "image": svc.image,
        "command": ["flotilla"],
        "args": engine_args(svc),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": _env(svc),
        "resources": _resources(svc, shm),
        "volumeMounts": mounts,
        **_probes(svc, config),
        # The pod leaves the Service's endpoints while this sleeps; then SIGTERM starts the engine's
        # drain (health 503, no new requests, in-flight ones finish).
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_SECONDS)]}}},
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(PORT),
        "prometheus.io/path": "/metrics",
        **svc.pod_annotations,
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": PRESTOP_SLEEP_SECONDS + svc.drain_seconds + 5,
        # The engine needs no API access; don't hand it a token.
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if svc.node_selector:
        pod_spec["nodeSelector"] = dict(svc.node_selector)
    if svc.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in svc.tolerations]
    if svc.affinity:
        pod_spec["affinity"] = dict(svc.affinity)
    if svc.priority_class_name:
        pod_spec["priorityClassName"] = svc.priority_class_name
    if svc.lora is not None:
        # Ready only once the operator has loaded spec.adapters into the pod (adapters.py sets the condition): a
        # Service never sends a request for an adapter to a pod still without it.
        pod_spec["readinessGates"] = [{"conditionType": ADAPTERS_CONDITION}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(svc),
        "spec": {
            "replicas": svc.desired_replicas,
            "selector": {"matchLabels": selector_labels(svc)},
            # Surge, never drop: no capacity is lost during a rollout (needs room for one extra pod).
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            # Model loading is slow; the default 600 s would call a healthy rollout failed.
            "progressDeadlineSeconds": startup_budget_seconds(svc, config) + 300,
            "template": {
                "metadata": {"labels": labels(svc), "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def render_loader_job(svc: InferenceService) -> dict[str, Any]:
    """The Job that downloads the model into the shared cache claim, once for every InferenceService that serves
    the same model from the same claim (see model_cache). Its pod template never changes after creation (a Job's
    template is immutable), so the first InferenceService to need it decides its image and environment."""
    assert svc.model_cache is not None
    name = model_cache.loader_job_name(svc)
    labels_ = {"app.kubernetes.io/name": "flotilla-model-loader", "app.kubernetes.io/component": "model-loader",
               "app.kubernetes.io/part-of": "flotilla", "app.kubernetes.io/managed-by": MANAGED_BY,
               model_cache.LOADER_LABEL: name}
    args = ["download", svc.model.uri]
    if svc.model.revision:
        args += ["--revision", svc.model.revision]
    container = {
        "name": "download",
        "image": svc.image,
        "command": ["flotilla"],
        "args": args + ["--report", "/dev/termination-log"],
        # HF_ENDPOINT (a mirror), proxies and the like come from the service's env, as for the engine.
        "env": [{"name": "HOME", "value": "/tmp"}, *_shared_cache_env(offline=False), *_credentials_env(svc),
                *[dict(e) for e in svc.env]],
        # The report is the termination message; a crash before it leaves the log's tail there instead.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "volumeMounts": [{"name": "model-cache", "mountPath": model_cache.MOUNT},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # each attempt a new pod, with its own termination message
        "containers": [container],
        "volumes": [{"name": "model-cache", "persistentVolumeClaim": {"claimName": svc.model_cache.claim_name}},
                    {"name": "tmp", "emptyDir": {}}],
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    for key, value in (("nodeSelector", dict(svc.node_selector)), ("tolerations", [dict(t) for t in svc.tolerations]),
                       ("affinity", dict(svc.affinity or {}))):
        if value:
            pod_spec[key] = value
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": svc.namespace, "labels": labels_,
                     "annotations": {"flotilla.dev/model": svc.model.uri,
                                     "flotilla.dev/revision": svc.model.revision or "",
                                     "flotilla.dev/claim": svc.model_cache.claim_name},
                     "ownerReferences": [owner_reference(svc, controller=False)]},
        "spec": {"backoffLimit": model_cache.BACKOFF_LIMIT,
                 "template": {"metadata": {"labels": labels_}, "spec": pod_spec}},
    }


def render_service(svc: InferenceService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(svc),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(svc),
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_pdb(svc: InferenceService) -> dict[str, Any] | None:
    """One pod at a time may be evicted; a single replica gets none (it would block node drains)."""
    if svc.desired_replicas <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(svc),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(svc)}},
    }


def _milli(value: float) -> str:
    return f"{round(value * 1000)}m"


def _scale_target(svc: InferenceService) -> dict[str, str]:
    # The autoscaler scales the InferenceService through its scale subresource, so spec.replicas
    # stays the one source of truth and the operator never fights an HPA over the Deployment.
    return {"apiVersion": API_VERSION, "kind": KIND, "name": svc.name}


def _behavior(svc: InferenceService) -> dict[str, Any]:
    a = svc.autoscaling
    return {"scaleUp": {"stabilizationWindowSeconds": a.scale_up_stabilization_seconds},
            "scaleDown": {"stabilizationWindowSeconds": a.scale_down_stabilization_seconds}}


def render_hpa(svc: InferenceService) -> dict[str, Any] | None:
    """autoscaling/v2 HPA on Pods metrics served by prometheus-adapter (which renames `vllm:x` to
    `vllm_x`: the custom metrics API does not allow colons)."""
    a = svc.autoscaling
    if not (a.enabled and a.mode == "hpa"):
        return None
    metrics = [{"type": "Pods", "pods": {
        "metric": {"name": "vllm_kv_cache_usage_perc"},
        "target": {"type": "AverageValue", "averageValue": _milli(a.target_kv_cache_utilization)}}}]
    if a.target_waiting_requests is not None:
        metrics.append({"type": "Pods", "pods": {
            "metric": {"name": "vllm_num_requests_waiting"},
            "target": {"type": "AverageValue", "averageValue": _milli(a.target_waiting_requests)}}})
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(svc),
        "spec": {"scaleTargetRef": _scale_target(svc), "minReplicas": a.min_replicas,
                 "maxReplicas": a.max_replicas, "metrics": metrics, "behavior": _behavior(svc)},
    }


def render_scaled_object(svc: InferenceService, prometheus_address: str) -> dict[str, Any] | None:
    """KEDA ScaledObject with Prometheus triggers. KEDA divides the query by the replica count
    (AverageValue), so the queries sum over the fleet."""
    a = svc.autoscaling
    if not (a.enabled and a.mode == "keda"):
        return None
    server = a.prometheus_address or prometheus_address
    match = f'namespace="{svc.namespace}",service="{svc.name}"'
    triggers = [{"type": "prometheus", "name": "kv-cache", "metadata": {
        "serverAddress": server, "query": f"sum(vllm:kv_cache_usage_perc{{{match}}})",
        "threshold": f"{a.target_kv_cache_utilization:g}"}}]
    if a.target_waiting_requests is not None:
        triggers.append({"type": "prometheus", "name": "waiting", "metadata": {
            "serverAddress": server, "query": f"sum(vllm:num_requests_waiting{{{match}}})",
            "threshold": f"{a.target_waiting_requests:g}"}})
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(svc),
        "spec": {"scaleTargetRef": _scale_target(svc), "minReplicaCount": a.min_replicas,
                 "maxReplicaCount": a.max_replicas,
                 "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(svc)}},
                 "triggers": triggers},
    }


@dataclass(frozen=True)
class Children:
    """What should exist for one InferenceService. `absent` lists optional kinds that must not exist
    (so that turning off autoscaling or scaling to one replica deletes the leftovers)."""

    objects: tuple[dict[str, Any], ...]
    absent: tuple[tuple[str, str], ...]  # (apiVersion, kind)


OPTIONAL_KINDS = (("policy/v1", "PodDisruptionBudget"), ("autoscaling/v2", "HorizontalPodAutoscaler"),
                  ("keda.sh/v1alpha1", "ScaledObject"))


def render_children(svc: InferenceService, config: Mapping[str, Any] | None = None,
                    prometheus_address: str = "http://prometheus-operated.monitoring.svc:9090") -> Children:
    """Every child object in apply order, and the optional kinds to delete."""
    optional = {
        "PodDisruptionBudget": render_pdb(svc),
        "HorizontalPodAutoscaler": render_hpa(svc),
        "ScaledObject": render_scaled_object(svc, prometheus_address),
    }
    objects = [render_service(svc), render_deployment(svc, config)]
    objects += [o for o in optional.values() if o is not None]
    absent = tuple((api, kind) for api, kind in OPTIONAL_KINDS if optional[kind] is None)
    return Children(tuple(objects), absent)
