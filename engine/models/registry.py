"""Which model class serves which architecture (``config.architectures[0]``), and vLLM's way to add one without a
fork::

    from flotilla.engine import ModelRegistry
    ModelRegistry.register_model("MyLlamaForCausalLM", MyLlamaForCausalLM)          # a class
    ModelRegistry.register_model("MyLlamaForCausalLM", "my_package.models:MyLlama")  # or imported on first use

The contract a model class meets (``LlamaForCausalLM`` in ``llama.py`` is the worked example):

- ``__init__(config)``: the transformers config; build every parameter on the current default device. The engine
  sets ``config.flotilla_max_model_len`` (the served context) before, for the models whose computation depends on
  it (LongRoPE picks its factors by it).
- ``forward(input_ids, positions) -> hidden``: tokens arrive flattened (``[num_tokens]``, no batch dimension, no
  padding) with their positions; attention goes through ``flotilla.engine.layers.attention.PagedAttention``, which
  reads and writes the paged KV cache. Returns ``[num_tokens, hidden_size]``.
- ``compute_logits(hidden) -> logits``: ``[rows, vocab_size]`` for the rows the sampler needs.
- ``attention_layers``: the model's ``PagedAttention`` modules, in layer order (the engine gives each its cache).
- ``load_weights(iterable of (checkpoint name, tensor)) -> set of names loaded``: raise ``ValueError`` for a tensor
  that has no parameter and for a parameter the checkpoint left unloaded, so a mismatch fails loudly.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from flotilla.engine.models.llama import LlamaForCausalLM

_BUILTIN: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,  # fused qkv/gate_up checkpoints, LongRoPE (128k), partial rotary (Phi-4-mini)
    "GemmaForCausalLM": LlamaForCausalLM,  # GeGLU, (1 + w) RMSNorm, embeddings scaled by sqrt(hidden_size)
    "Gemma2ForCausalLM": LlamaForCausalLM,  # + sandwich norms, soft-capped scores and logits, alternating windows
    "Gemma3ForCausalLM": LlamaForCausalLM,  # (text) + q/k norms, five windowed layers to one global, RoPE per kind
    # Mixture of experts: top-k routing and a fused grouped GEMM over the experts (kernels/moe.py)
    "MixtralForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": LlamaForCausalLM,  # plus a gated shared expert
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    # Bare decoders, no LM head: embedding models (e5-mistral, gte-Qwen2, ...), served by the pooling runner
    "LlamaModel": LlamaForCausalLM,
    "MistralModel": LlamaForCausalLM,
    "Qwen2Model": LlamaForCausalLM,
    "Qwen3Model": LlamaForCausalLM,
}


class ModelRegistry:
    """Architectures this process can serve: the built-in ones and those registered at run time."""

    _models: dict[str, type[nn.Module] | str] = dict(_BUILTIN)

    @classmethod
    def register_model(cls, architecture: str, model: type[nn.Module] | str) -> None:
        """Serve ``architecture`` with ``model``: a class, or ``"module.path:ClassName"`` imported on first use.
        Registering a name again replaces what it pointed to (as in vLLM)."""
        if not isinstance(architecture, str) or not architecture:
            raise ValueError("architecture: must be a non-empty string")
        if isinstance(model, str):
            if model.count(":") != 1 or not all(model.split(":")):
                raise ValueError(f"model: {model!r} is not 'module.path:ClassName'")
        elif not (isinstance(model, type) and issubclass(model, nn.Module)):
            raise ValueError(f"model: {model!r} is neither a torch.nn.Module subclass nor 'module.path:ClassName'")
        cls._models[architecture] = model

    @classmethod
    def get_supported_archs(cls) -> list[str]:
        return sorted(cls._models)

    @classmethod
    def is_supported(cls, architecture: str) -> bool:
        return architecture in cls._models

    @classmethod
    def resolve(cls, architecture: str) -> type[nn.Module]:
        """The class for ``architecture`` (importing a lazily registered one); ``ValueError`` when unknown."""
        model: Any = cls._models.get(architecture)
        if model is None:
            raise ValueError(f"architecture {architecture} is not supported; supported: {cls.get_supported_archs()} "
                             "(ModelRegistry.register_model adds one)")
        if isinstance(model, str):
            module, name = model.split(":")
            try:
                model = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"architecture {architecture}: cannot import {module}:{name}: {e}") from e
            cls._models[architecture] = model
        return model
