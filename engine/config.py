"""Engine arguments, named as vLLM names them, and the resolved configuration the engine runs with."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from flotilla.kernels import cpu_build

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # --max-lora-rank's choices, as vLLM's

# /proc/cpuinfo flags of CPUs with bf16 arithmetic in hardware: x86 AVX512-BF16 and AMX-BF16, Arm BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass
class EngineArgs:
    """Everything that configures an engine. Field names follow vLLM's ``EngineArgs``."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    # KV-cache memory on CPU in GiB, as vLLM's CPU backend sets it with VLLM_CPU_KVCACHE_SPACE.
    cpu_kvcache_space_gib: float | None = None
    swap_space: float = 4.0  # GiB of CPU memory for swapped-out KV blocks (preemption_mode="swap")
    preemption_mode: str = "recompute"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    load_format: str = "auto"
    seed: int = 0
    device: str = "auto"
    served_model_name: str | None = None
    trust_remote_code: bool = False
    enforce_eager: bool = False  # True: no CUDA graphs (they capture decode steps on a GPU: cuda_graphs.py)
    # vLLM's compilation config, the CUDA-graph part of it: {"cudagraph_mode", "max_cudagraph_capture_size"}
    # (a dict or its JSON; see CompilationConfig)
    compilation_config: dict[str, Any] | str | None = None
    disable_log_stats: bool = True
    revision: str | None = None  # branch, tag or commit of a Hugging Face repo (or ORG/NAME@REV)
    download_dir: str | None = None  # the Hugging Face cache to download into (default: HF_HOME's)
    hf_token: str | None = None  # default: HF_TOKEN
    tensor_parallel_size: int = 1  # ranks the model is split over (one process each; GPUs: one per rank)
    # Run synthetic steps of the served shapes before reporting ready (model_runner.warm_up_plans).
    warmup: bool = True
    # What the model serves: "generate" (tokens), "pooling" (embeddings), "auto" (pooling for a bare "...Model"
    # architecture); vLLM's older task="embed" means pooling. pooler_config: {"pooling_type", "normalize"}.
    runner: str = "auto"
    task: str = "auto"
    pooler_config: dict[str, Any] | str | None = None
    # Multi-LoRA (engine/lora/): adapters on the base model, up to max_loras of them in one step (one device slot
    # each), of rank up to max_lora_rank; max_cpu_loras adapters kept in host memory (default: max_loras).
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineArgs":
        """Build from keyword arguments, rejecting names vLLM users might mistype with a clear error."""
        unknown = sorted(set(kwargs) - cls.field_names())
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def resolve_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def resolve_dtype(self, config_dtype: torch.dtype | None, device: torch.device,
                      cpu_flags: set[str] | None = None) -> torch.dtype:
        """``auto`` takes the checkpoint's half dtype on GPU (bf16 when it is fp32); on the CPU, bf16 where the
        CPU computes it natively (AVX512-BF16 or AMX on x86, BF16 on Arm: ~1.6x the fp32 throughput) and fp32
        elsewhere, where bf16 is emulated and slower. ``cpu_flags``: this CPU's, read from /proc/cpuinfo."""
        if self.dtype != "auto":
            if self.dtype not in _DTYPES:
                raise ValueError(f"dtype: unsupported value {self.dtype!r}; use one of {sorted(_DTYPES)}")
            return _DTYPES[self.dtype]
        if device.type == "cuda":
            return config_dtype if config_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        flags = cpu_build.cpu_flags() if cpu_flags is None else cpu_flags
        return torch.bfloat16 if flags & NATIVE_BF16_FLAGS else torch.float32

    def validate(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size: must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format: must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode: must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space: must be >= 0 GiB, got {self.swap_space}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras: must be >= 1, got {self.max_loras}")
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank: must be one of {', '.join(map(str, LORA_RANKS))} (vLLM's), got "
                             f"{self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        CompilationConfig.parse(self.compilation_config)
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override: must be >= 1, got {self.num_gpu_blocks_override}")


CUDAGRAPH_MODES = ("NONE", "PIECEWISE", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")


def json_option(name: str, value: dict[str, Any] | str | None, keys: set[str], note: str = "") -> dict[str, Any]:
    """A vLLM-style structured option (``--pooler-config``, ``--compilation-config``): a dict, or its JSON text, with
    only the ``keys`` Flotilla acts on (an unknown key is refused, naming them; ``note`` says why). None: {}."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not JSON: {e}") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name}: expected a JSON object, got {value!r}")
    unknown = sorted(set(value or {}) - keys)
    if unknown:
        raise ValueError(f"{name}: unknown field(s) {', '.join(unknown)}{note}; it takes {', '.join(sorted(keys))}")
    return dict(value or {})


@dataclass(frozen=True)
class CompilationConfig:
    """Which steps run as CUDA graphs (cuda_graphs.py), in vLLM's terms. ``FULL_DECODE_ONLY``: a pure-decode step
    replays one graph of its whole forward pass; other steps run eagerly. ``PIECEWISE``: every step of up to
    ``max_cudagraph_capture_size`` tokens replays graphs of everything between its attention calls, which run
    eagerly. ``FULL_AND_PIECEWISE``: the first for pure-decode steps, the second for the rest. ``NONE``: no graphs
    (as ``enforce_eager``)."""

    cudagraph_mode: str = "FULL_DECODE_ONLY"
    # the largest step (in tokens) a piecewise graph is captured for, and the largest decode batch a full one is
    # (None: max_num_seqs for decode batches, 1024 tokens for the rest; never more than max_num_batched_tokens)
    max_cudagraph_capture_size: int | None = None

    @property
    def decode_graphs(self) -> bool:
        return self.cudagraph_mode in ("FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")

    @property
    def piecewise_graphs(self) -> bool:
        return self.cudagraph_mode in ("PIECEWISE", "FULL_AND_PIECEWISE")

    @classmethod
    def parse(cls, value: dict[str, Any] | str | None) -> "CompilationConfig":
        """From ``--compilation-config``'s JSON (or the dict ``LLM(compilation_config=...)`` takes). Keys Flotilla
        does not act on are refused, naming the ones it does."""
        value = json_option("compilation_config", value, {"cudagraph_mode", "max_cudagraph_capture_size"},
                            " (Flotilla does not torch.compile)")
        mode = str(value.get("cudagraph_mode", cls.cudagraph_mode)).upper()
        if mode == "FULL":
            raise ValueError("compilation_config: cudagraph_mode FULL is not supported (the prefill attention's "
                             "launch depends on the step's prompts, so it cannot be captured); use FULL_AND_PIECEWISE")
        if mode not in CUDAGRAPH_MODES:
            raise ValueError(f"compilation_config: cudagraph_mode must be one of {', '.join(CUDAGRAPH_MODES)}, got "
                             f"{value['cudagraph_mode']!r}")
        size = value.get("max_cudagraph_capture_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"compilation_config: max_cudagraph_capture_size must be an integer >= 1, got {size!r}")
        return cls(mode, size)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool
    preemption_mode: str = "recompute"
    max_loras: int = 0  # the most distinct adapters among running requests (0: no adapters served)


def cpu_kvcache_gib_setting(args: EngineArgs) -> float | None:
    """KV-cache space on CPU as configured: the argument, else VLLM_CPU_KVCACHE_SPACE (vLLM's knob), else None
    (then ``host_memory.cpu_kv_cache_bytes`` picks it)."""
    if args.cpu_kvcache_space_gib is not None:
        return args.cpu_kvcache_space_gib
    env = os.environ.get("FLOTILLA_CPU_KVCACHE_SPACE") or os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    return float(env) if env else None

