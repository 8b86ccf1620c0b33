"""The InferenceService spec as typed, defaulted dataclasses.

The API server applies the CRD's defaults before the operator sees an object, but the operator must not
depend on that (an object stored under an older CRD has none), so every default lives here too; a test
checks that the two agree. `parse_service` is the one place where a raw dict becomes typed data; after
it, nothing in the operator reads the raw spec again.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from flotilla.operator.quantity import quantity_bytes

DEFAULT_ENGINE_IMAGE = "ghcr.io/flotilla-dev/flotilla-engine:0.1.0"
#: The operator's Deployment can point every service at a mirror or a pinned digest.
ENGINE_IMAGE_ENV = "FLOTILLA_ENGINE_IMAGE"

AutoscalingMode = Literal["builtin", "hpa", "keda"]
ModelSource = Literal["hf", "s3", "pvc", "local"]
_PVC_URI = re.compile(r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.+$")


class SpecError(ValueError):
    """A spec the operator cannot realise. `reason` is a CamelCase word for status conditions."""

    def __init__(self, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ConfigMapKeyRef:
    name: str
    key: str = "config.json"


@dataclass(frozen=True)
class ModelSpec:
    """Which weights to serve. `uri` is a Hugging Face id (`ORG/NAME`, `hf://ORG/NAME[@REV]`), `s3://bucket/prefix`,
    `pvc://claim/path`, or a path in the image."""

    uri: str
    served_model_name: str | None = None
    tokenizer: str | None = None
    #: Branch, tag or commit of a hub repo (the engine's --revision).
    revision: str | None = None
    #: A Secret whose keys HF_TOKEN / AWS_* become the engine's environment (never its args).
    credentials_secret_ref: str | None = None
    #: The model's config.json, inline; lets the operator check the fit and size the startup probe.
    config: Mapping[str, Any] | None = None
    config_map_ref: ConfigMapKeyRef | None = None

    @property
    def source(self) -> ModelSource:
        if self.uri.startswith("pvc://"):
            return "pvc"
        if self.uri.startswith("s3://"):
            return "s3"
        if self.uri.startswith("/") or self.uri.startswith("./"):
            return "local"
        return "hf"

    @property
    def pvc_claim_and_path(self) -> tuple[str, str]:
        """For `pvc://claim/some/dir`: ("claim", "some/dir")."""
        rest = self.uri[len("pvc://"):]
        claim, _, path = rest.partition("/")
        return claim, path.strip("/")


@dataclass(frozen=True)
class EngineSpec:
    """Engine flags; names mirror vLLM's so a vLLM user can carry their settings over."""

    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResourceSpec:
    gpus: int = 1
    gpu_resource_name: str = "nvidia.com/gpu"
    cpu: str | None = None
    memory: str | None = None
    #: Memory of one GPU, for the fit check; when unset the operator reads a node label instead.
    gpu_memory_bytes: int | None = None


@dataclass(frozen=True)
class AutoscalingSpec:
    enabled: bool = False
    mode: AutoscalingMode = "builtin"
    min_replicas: int = 1
    max_replicas: int = 4
    target_kv_cache_utilization: float = 0.8
    target_waiting_requests: float | None = None
    scale_up_stabilization_seconds: int = 0
    scale_down_stabilization_seconds: int = 300
    #: Prometheus that KEDA queries (mode keda only); the operator's setting is the default.
    prometheus_address: str | None = None
    #: With minReplicas 0 (builtin mode): no request for this long scales the service to zero; the router holds
    #: the next request and asks for a replica.
    scale_to_zero_after_seconds: int = 600


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str = "api-key"


@dataclass(frozen=True)
class ModelCacheSpec:
    """An existing PersistentVolumeClaim that keeps downloaded weights across pod restarts."""

    claim_name: str
    read_only: bool = False


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter served on the base model: ``name`` is what clients send as ``model``; ``uri`` a Hugging Face
    repo id (``ORG/NAME``, ``hf://ORG/NAME[@REV]``), ``s3://bucket/prefix`` or a path in the image."""

    name: str
    uri: str


@dataclass(frozen=True)
class LoRASpec:
    """The engine's multi-LoRA settings (vLLM's --max-loras, --max-lora-rank, --max-cpu-loras). Set (or implied by
    ``spec.adapters``), the engines start with LoRA on, and adapters come and go without a restart."""

    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None


@dataclass(frozen=True)
class InferenceService:
    """One InferenceService, typed. `name`/`namespace`/`uid` come from metadata (owner references)."""

    name: str
    namespace: str
    model: ModelSpec
    uid: str = ""
    generation: int = 0
    engine: EngineSpec = field(default_factory=EngineSpec)
    image: str = DEFAULT_ENGINE_IMAGE
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    shm_size_bytes: int | None = None
    replicas: int = 1
    autoscaling: AutoscalingSpec = field(default_factory=AutoscalingSpec)
    api_key_secret_ref: SecretKeyRef | None = None
    model_cache: ModelCacheSpec | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    env: tuple[Mapping[str, Any], ...] = ()
    pod_annotations: Mapping[str, str] = field(default_factory=dict)
    priority_class_name: str | None = None
    #: Seconds the engine gets to finish in-flight requests after SIGTERM.
    drain_seconds: int = 120
    adapters: tuple[AdapterSpec, ...] = ()
    lora: LoRASpec | None = None

    @property
    def served_model_name(self) -> str:
        return self.model.served_model_name or self.model.uri.rstrip("/").rsplit("/", 1)[-1].split("@", 1)[0]

    @property
    def desired_replicas(self) -> int:
        """spec.replicas, kept inside the autoscaling bounds when autoscaling owns it."""
        if self.autoscaling.enabled:
            return min(max(self.replicas, self.autoscaling.min_replicas), self.autoscaling.max_replicas)
        return self.replicas

    @property
    def endpoint(self) -> str:
        return f"http://{self.name}.{self.namespace}.svc:8000/v1"


def default_engine_image() -> str:
    return os.environ.get(ENGINE_IMAGE_ENV) or DEFAULT_ENGINE_IMAGE


def _opt(d: Mapping[str, Any], key: str, kind: type) -> Any:
    value = d.get(key)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpecError(f"{key} must be {kind.__name__}, got {value!r}")
    return value


def _get(d: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = _opt(d, key, kind)
    return default if value is None else value


def _quantity(d: Mapping[str, Any], key: str) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    try:
        return quantity_bytes(value)
    except ValueError as e:
        raise SpecError(f"{key}: {e}") from None


def _model(d: Mapping[str, Any]) -> ModelSpec:
    uri = _opt(d, "uri", str)
    if not uri:
        raise SpecError("spec.model.uri is required")
    ref = d.get("configMapRef")
    credentials = d.get("credentialsSecretRef")
    model = ModelSpec(
        uri=uri,
        served_model_name=_opt(d, "servedModelName", str),
        tokenizer=_opt(d, "tokenizer", str),
        revision=_opt(d, "revision", str),
        credentials_secret_ref=credentials["name"] if credentials else None,
        config=_opt(d, "config", dict),
        config_map_ref=ConfigMapKeyRef(ref["name"], ref.get("key", "config.json")) if ref else None,
    )
    if model.source == "pvc" and not _PVC_URI.match(uri):
        raise SpecError(f"model.uri {uri!r}: expected pvc://<claim>/<path>")
    if model.revision and model.source != "hf":
        raise SpecError(f"model.revision applies to Hugging Face repos only, not {uri!r}")
    if model.revision and "@" in uri:
        raise SpecError(f"model.uri {uri!r} pins a revision already; drop model.revision")
    return model


def _engine(d: Mapping[str, Any]) -> EngineSpec:
    base = EngineSpec()
    return EngineSpec(
        max_model_len=_opt(d, "maxModelLen", int),
        max_num_seqs=_get(d, "maxNumSeqs", int, base.max_num_seqs),
        max_num_batched_tokens=_opt(d, "maxNumBatchedTokens", int),
        gpu_memory_utilization=_get(d, "gpuMemoryUtilization", float, base.gpu_memory_utilization),
        block_size=_get(d, "blockSize", int, base.block_size),
        enable_prefix_caching=_get(d, "enablePrefixCaching", bool, base.enable_prefix_caching),
        enable_chunked_prefill=_get(d, "enableChunkedPrefill", bool, base.enable_chunked_prefill),
        kv_cache_dtype=_get(d, "kvCacheDtype", str, base.kv_cache_dtype),
        quantization=_opt(d, "quantization", str),
        dtype=_get(d, "dtype", str, base.dtype),
        tensor_parallel_size=_get(d, "tensorParallelSize", int, base.tensor_parallel_size),
        extra_args=tuple(str(a) for a in d.get("extraArgs") or ()),
    )


def _resources(d: Mapping[str, Any]) -> ResourceSpec:
    base = ResourceSpec()
    cpu, memory = d.get("cpu"), d.get("memory")
    return ResourceSpec(
        gpus=_get(d, "gpus", int, base.gpus),
        gpu_resource_name=_get(d, "gpuResourceName", str, base.gpu_resource_name),
        cpu=None if cpu is None else str(cpu),
        memory=None if memory is None else str(memory),
        gpu_memory_bytes=_quantity(d, "gpuMemoryBytes"),
    )


def _autoscaling(d: Mapping[str, Any]) -> AutoscalingSpec:
    base = AutoscalingSpec()
    mode = _get(d, "mode", str, base.mode)
    if mode not in ("builtin", "hpa", "keda"):
        raise SpecError(f"autoscaling.mode must be builtin, hpa or keda, got {mode!r}")
    return AutoscalingSpec(
        enabled=_get(d, "enabled", bool, base.enabled),
        mode=mode,
        min_replicas=_get(d, "minReplicas", int, base.min_replicas),
        max_replicas=_get(d, "maxReplicas", int, base.max_replicas),
        target_kv_cache_utilization=_get(d, "targetKVCacheUtilization", float, base.target_kv_cache_utilization),
        target_waiting_requests=_opt(d, "targetWaitingRequests", float),
        scale_up_stabilization_seconds=_get(d, "scaleUpStabilizationSeconds", int, base.scale_up_stabilization_seconds),
        scale_down_stabilization_seconds=_get(
            d, "scaleDownStabilizationSeconds", int, base.scale_down_stabilization_seconds),
        prometheus_address=_opt(d, "prometheusAddress", str),
        scale_to_zero_after_seconds=_get(d, "scaleToZeroAfterSeconds", int, base.scale_to_zero_after_seconds),
    )


_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _lora(spec: Mapping[str, Any]) -> tuple[tuple[AdapterSpec, ...], LoRASpec | None]:
    raw = spec.get("adapters")
    adapters = []
    for i, a in enumerate(raw or ()):
        if not isinstance(a, Mapping) or not a.get("name") or not a.get("uri"):
            raise SpecError(f"adapters[{i}]: needs name and uri")
        adapters.append(AdapterSpec(str(a["name"]), str(a["uri"])))
    d = spec.get("lora")
    if d is None and raw is None:
        return (), None
    base = LoRASpec()
    d = d or {}
    return tuple(adapters), LoRASpec(max_loras=_get(d, "maxLoras", int, base.max_loras),
                                     max_lora_rank=_get(d, "maxLoraRank", int, base.max_lora_rank),
                                     max_cpu_loras=_opt(d, "maxCpuLoras", int))


def _validate_lora(svc: InferenceService) -> None:
    names = [a.name for a in svc.adapters]
    for a in svc.adapters:
        if not _ADAPTER_NAME.match(a.name):
            raise SpecError(f"adapters: name {a.name!r} must be 1-128 letters, digits and . _ : / -")
        if a.uri.startswith("pvc://"):
            raise SpecError(f"adapters: {a.name}: pvc:// is not mounted for adapters; use a hub repo, s3:// or a "
                            "path in the image")
    if len(set(names)) != len(names):
        raise SpecError(f"adapters: names must be unique ({', '.join(names)})")
    if svc.served_model_name in names:
        raise SpecError(f"adapters: {svc.served_model_name!r} is the base model's served name")
    if svc.lora is not None and svc.api_key_secret_ref is not None:
        raise SpecError("adapters / lora with apiKeySecretRef: the operator loads adapters through the engines' "
                        "endpoints, which the API key guards, and it never reads Secrets; drop one of them")
    lora = svc.lora
    if lora is None:
        return
    if lora.max_loras < 1:
        raise SpecError(f"lora.maxLoras must be >= 1, got {lora.max_loras}")
    if lora.max_lora_rank not in LORA_RANKS:
        raise SpecError(f"lora.maxLoraRank must be one of {', '.join(map(str, LORA_RANKS))}, got {lora.max_lora_rank}")
    if lora.max_cpu_loras is not None and lora.max_cpu_loras < lora.max_loras:
        raise SpecError(f"lora.maxCpuLoras ({lora.max_cpu_loras}) must be >= lora.maxLoras ({lora.max_loras})")


def validate(svc: InferenceService) -> None:
    """Cross-field rules. The CRD's CEL rules say the same; this copy guards objects stored before them."""
    e, r, a = svc.engine, svc.resources, svc.autoscaling
    if not 0 < e.gpu_memory_utilization <= 0.95:
        raise SpecError(f"engine.gpuMemoryUtilization must be in (0, 0.95], got {e.gpu_memory_utilization}")
    if r.gpus < 0 or svc.replicas < 0:
        raise SpecError("resources.gpus and replicas must not be negative")
    if e.tensor_parallel_size < 1 or e.tensor_parallel_size > max(r.gpus, 1):
        raise SpecError(
            f"engine.tensorParallelSize ({e.tensor_parallel_size}) must be between 1 and resources.gpus ({r.gpus})")
    if a.min_replicas < 0 or a.min_replicas > a.max_replicas:
        raise SpecError(
            f"autoscaling.minReplicas ({a.min_replicas}) must be >= 0 and <= maxReplicas ({a.max_replicas})")
    if a.min_replicas == 0 and a.mode != "builtin":
        raise SpecError("autoscaling.minReplicas 0 (scale to zero) needs mode builtin: the operator scales from zero "
                        "when the router asks for a replica")
    if a.scale_to_zero_after_seconds < 30:
        raise SpecError("autoscaling.scaleToZeroAfterSeconds must be >= 30")
    if not 0 < a.target_kv_cache_utilization < 1:
        raise SpecError(
            f"autoscaling.targetKVCacheUtilization must be in (0, 1), got {a.target_kv_cache_utilization}")
    if a.target_waiting_requests is not None and a.target_waiting_requests <= 0:
        raise SpecError("autoscaling.targetWaitingRequests must be > 0")
    _validate_lora(svc)


def parse_service(body: Mapping[str, Any], default_image: str | None = None) -> InferenceService:
    """Typed, defaulted, validated view of an InferenceService object (metadata + spec).

    Raises SpecError with a message fit for status when the spec cannot be realised.
    """
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    api_key = spec.get("apiKeySecretRef")
    cache = spec.get("modelCache")
    try:
        adapters, lora = _lora(spec)
        svc = InferenceService(
            name=meta["name"],
            namespace=meta.get("namespace") or "default",
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation") or 0),
            model=_model(spec.get("model") or {}),
            engine=_engine(spec.get("engine") or {}),
            image=_opt(spec, "image", str) or default_image or default_engine_image(),
            resources=_resources(spec.get("resources") or {}),
            shm_size_bytes=_quantity(spec, "shmSize"),
            replicas=_get(spec, "replicas", int, 1),
            autoscaling=_autoscaling(spec.get("autoscaling") or {}),
            api_key_secret_ref=SecretKeyRef(api_key["name"], api_key.get("key", "api-key")) if api_key else None,
            model_cache=ModelCacheSpec(cache["claimName"], bool(cache.get("readOnly", False))) if cache else None,
            node_selector=dict(spec.get("nodeSelector") or {}),
            tolerations=tuple(spec.get("tolerations") or ()),
            affinity=spec.get("affinity"),
            env=tuple(spec.get("env") or ()),
            pod_annotations=dict(spec.get("podAnnotations") or {}),
            priority_class_name=_opt(spec, "priorityClassName", str),
            drain_seconds=_get(spec, "drainSeconds", int, 120),
            adapters=adapters,
            lora=lora,
        )
    except KeyError as e:
        raise SpecError(f"missing required field {e.args[0]}") from None
    validate(svc)
    return svc
