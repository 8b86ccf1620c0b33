"""Will the model fit? Memory arithmetic done before any GPU is allocated.

Every other operator finds out that a model does not fit when the pod crash-loops with CUDA OOM after
minutes of downloading. When the operator knows the model's config.json (inline in the spec or from a
ConfigMap) it can do the arithmetic up front: weights (parameters × bytes per parameter) plus the KV
cache for one `maxModelLen` sequence, against the usable GPU memory (GPUs × memory per GPU ×
gpuMemoryUtilization). The same weight size also sizes the startup probe (loading time).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

from flotilla.operator.quantity import human_bytes
from flotilla.operator.spec import InferenceService

#: GPU feature discovery labels each GPU node with its per-GPU memory in MiB.
GPU_MEMORY_NODE_LABEL = "nvidia.com/gpu.memory"
#: Below this much headroom the spec is "tight": it fits one sequence but leaves little for batching
#: and activations, so the engine will run with a tiny KV pool.
TIGHT_HEADROOM = 0.10

_DTYPE_BYTES = {"float32": 4.0, "float": 4.0, "float16": 2.0, "half": 2.0, "bfloat16": 2.0}
# Bytes per parameter of the weights under each quantization scheme. 4-bit schemes carry per-group
# scales and zeros (group size 128, fp16): about 0.53 bytes per parameter.
_QUANT_BYTES = {"awq": 0.53, "gptq": 0.53, "bitsandbytes": 0.53, "gguf": 0.6, "fp8": 1.0, "int8": 1.0,
                "compressed-tensors": 1.0}

Verdict = Literal["Fits", "Tight", "DoesNotFit", "Unknown"]


@dataclass(frozen=True)
class ModelShape:
    """The fields of a Llama-family config.json that decide memory use, mixtures of experts included (Mixtral,
    Qwen2-MoE, Qwen3-MoE: every expert's weights are held, though only ``top_k`` of them run per token)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # a dense MLP's
    vocab_size: int
    tie_word_embeddings: bool
    num_experts: int  # 1: no mixture
    torch_dtype: str
    max_position_embeddings: int | None
    sparse_layers: int = 0  # layers whose MLP is a mixture of experts
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert
    qkv_bias: bool = False  # Qwen2's q/k/v biases
    qk_norm: bool = False  # Qwen3's per-head q/k RMSNorm

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelShape":
        """Read a Hugging Face config.json; raises ValueError when a needed field is missing."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            layers = int(config["num_hidden_layers"])
            kind = str(config.get("model_type") or "")
            experts = int(config.get("num_local_experts") or config.get("num_experts") or 1)
            return cls(
                hidden_size=hidden,
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate_size=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                num_experts=experts,
                torch_dtype=str(config.get("torch_dtype") or "bfloat16"),
                max_position_embeddings=config.get("max_position_embeddings"),
                sparse_layers=_sparse_layers(config, layers) if experts > 1 else 0,
                expert_intermediate_size=int(config.get("moe_intermediate_size") or config["intermediate_size"]),
                shared_expert_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0),
                qkv_bias=bool(config.get("qkv_bias", kind in ("qwen2", "qwen2_moe"))),
                qk_norm=kind in ("qwen3", "qwen3_moe"),
            )
        except KeyError as e:
            raise ValueError(f"config.json has no {e.args[0]}") from None

    @property
    def parameters(self) -> int:
        """Parameter count of a Llama-family decoder (attention, gated MLPs dense or mixed, RMSNorms, embeddings)."""
        h = self.hidden_size
        q_kv_rows = self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        attn = h * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        attn += q_kv_rows * self.qkv_bias + 2 * self.head_dim * self.qk_norm
        dense = 3 * h * self.intermediate_size
        sparse = 3 * h * self.expert_intermediate_size * self.num_experts + h * self.num_experts  # experts, router
        if self.shared_expert_intermediate_size:
            sparse += 3 * h * self.shared_expert_intermediate_size + h  # the shared expert and its gate
        mlps = self.sparse_layers * sparse + (self.num_layers - self.sparse_layers) * dense
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + 2 * h) + mlps + embeddings + h


def _sparse_layers(config: Mapping[str, Any], layers: int) -> int:
    """How many layers are mixtures of experts: all of Mixtral's; Qwen's every ``decoder_sparse_step``-th layer
    that ``mlp_only_layers`` does not keep dense."""
    if config.get("model_type") == "mixtral" or "num_local_experts" in config:
        return layers
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or [])
    return sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)


def parameters_from_name(uri: str) -> int | None:
    """Parameter count from a model name such as `Llama-3.1-8B` or `Mixtral-8x7B` (None if absent).

    A fallback for sizing the startup probe when no config.json is known; never used for the fit check.
    """
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    match = re.search(r"(?:^|[-_.])(?:(\d+)x)?(\d+(?:\.\d+)?)([BbMm])(?=$|[-_.])", name)
    if not match:
        return None
    experts, number, unit = match.groups()
    count = float(number) * (1e9 if unit in "Bb" else 1e6) * (int(experts) if experts else 1)
    return int(count)


def weight_bytes_per_parameter(svc: InferenceService, shape: ModelShape | None) -> float:
    e = svc.engine
    if e.quantization:
        return _QUANT_BYTES.get(e.quantization, 2.0)
    dtype = e.dtype if e.dtype != "auto" else (shape.torch_dtype if shape else "bfloat16")
    return _DTYPE_BYTES.get(dtype, 2.0)


def kv_heads_per_gpu(shape: ModelShape, tp: int) -> int:
    """KV heads one tensor-parallel rank holds: its share, or one replicated head when ranks outnumber them
    (as the engine shards them: engine/parallel.py)."""
    return max(1, shape.num_kv_heads // tp)


def kv_bytes_per_token(svc: InferenceService, shape: ModelShape, tp: int = 1) -> int:
    """Keys and values for every layer, for one token, on one of `tp` tensor-parallel GPUs."""
    kv = svc.engine.kv_cache_dtype
    if kv.startswith("fp8"):
        elem = 1
    else:
        dtype = svc.engine.dtype if svc.engine.dtype != "auto" else shape.torch_dtype
        elem = 4 if dtype in ("float32", "float") else 2
    return 2 * shape.num_layers * kv_heads_per_gpu(shape, tp) * shape.head_dim * elem


@dataclass(frozen=True)
class FitReport:
    """The outcome of the fit check, with the arithmetic spelled out for status and events."""

    verdict: Verdict
    message: str
    required_bytes: int = 0
    available_bytes: int = 0


def check_fit(svc: InferenceService, config: Mapping[str, Any] | None,
              gpu_memory_bytes: int | None) -> FitReport:
    """Per GPU: its shard of the weights plus its share of one maxModelLen sequence's KV cache, against one GPU's
    usable memory. Tensor parallelism splits the weights and the KV heads over tensorParallelSize GPUs."""
    if svc.resources.gpus == 0:
        return FitReport("Unknown", "no GPUs requested: the fit check applies to GPU memory only")
    if config is None:
        return FitReport("Unknown", "model config.json not given (spec.model.config or configMapRef)")
    gpu_memory = gpu_memory_bytes or svc.resources.gpu_memory_bytes
    if not gpu_memory:
        return FitReport("Unknown", "GPU memory unknown: set resources.gpuMemoryBytes or label nodes with "
                                    f"{GPU_MEMORY_NODE_LABEL}")
    try:
        shape = ModelShape.from_config(config)
    except ValueError as e:
        return FitReport("Unknown", f"cannot read model config: {e}")

    params = shape.parameters
    per_param = weight_bytes_per_parameter(svc, shape)
    tp = svc.engine.tensor_parallel_size
    weights = int(params * per_param) // tp
    seq_len = svc.engine.max_model_len or shape.max_position_embeddings or 4096
    per_token = kv_bytes_per_token(svc, shape, tp)
    kv = per_token * seq_len
    required = weights + kv
    util = svc.engine.gpu_memory_utilization
    available = int(gpu_memory * util)

    split = f" / {tp} GPUs" if tp > 1 else ""
    arithmetic = (
        f"weights {human_bytes(weights)} ({params / 1e9:.2f}B params x {per_param:g} B{split}) + "
        f"KV cache {human_bytes(kv)} for one {seq_len}-token sequence ({per_token} B/token{split}) = "
        f"{human_bytes(required)} per GPU; usable {human_bytes(available)} "
        f"(1 GPU x {human_bytes(gpu_memory)} x {util:g})")
    if required > available:
        return FitReport("DoesNotFit", f"does not fit: {arithmetic}", required, available)
    if required > available * (1 - TIGHT_HEADROOM):
        return FitReport("Tight", f"tight fit, under {TIGHT_HEADROOM:.0%} headroom: {arithmetic}",
                         required, available)
    return FitReport("Fits", f"fits: {arithmetic}", required, available)


def gpu_memory_from_nodes(node_labels: Iterable[Mapping[str, str]]) -> int | None:
    """Per-GPU memory in bytes from nodes' GPU feature discovery labels (MiB); the smallest wins,
    because the scheduler may pick any of the matching nodes."""
    sizes = []
    for labels in node_labels:
        value = labels.get(GPU_MEMORY_NODE_LABEL)
        if value and value.isdigit():
            sizes.append(int(value) * 2**20)
    return min(sizes) if sizes else None


def model_weight_bytes(svc: InferenceService, config: Mapping[str, Any] | None) -> int | None:
    """Bytes of weights to load, from config.json, else from the parameter count in the model's name."""
    shape = None
    if config is not None:
        try:
            shape = ModelShape.from_config(config)
        except ValueError:
            shape = None
    params = shape.parameters if shape else parameters_from_name(svc.model.uri)
    if params is None:
        return None
    return int(params * weight_bytes_per_parameter(svc, shape))


# Loading is bounded by the slowest stage: a hub download is far slower than a local disk read. These
# are deliberately pessimistic rates (a probe that gives up too early kills a healthy pod forever).
# Downloads (hub, S3) are budgeted at a conservative 50 MB/s; volume and image reads at 200 MB/s.
_LOAD_BYTES_PER_SECOND = {"hf": 50e6, "s3": 50e6, "pvc": 200e6, "local": 200e6}
STARTUP_BASE_SECONDS = 120       # interpreter, CUDA context, profiling run, CUDA graphs
STARTUP_UNKNOWN_SECONDS = 1800   # no idea of the size: give it half an hour
STARTUP_MAX_SECONDS = 4 * 3600


def startup_budget_seconds(svc: InferenceService, config: Mapping[str, Any] | None) -> int:
    """How long the startup probe waits before declaring the engine dead, from the weights to load."""
    weights = model_weight_bytes(svc, config)
    if weights is None:
        return STARTUP_UNKNOWN_SECONDS
    # With a shared model cache the loader Job has downloaded the weights before any engine pod starts: the pod
    # reads them from the claim. Without one, every pod downloads them itself, and its budget includes that.
    source = "pvc" if svc.model_cache else svc.model.source
    seconds = STARTUP_BASE_SECONDS + weights / _LOAD_BYTES_PER_SECOND[source]
    return int(min(math.ceil(seconds), STARTUP_MAX_SECONDS))
