"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3, Gemma 1/2/3, SmolLM) and its mixture-of-experts
relatives (Mixtral, Qwen2-MoE, Qwen3-MoE: the MLP of some or all layers is sparse), written against Flotilla's layers.

Tokens arrive flattened, ``[num_tokens]`` with their positions: no batch dimension and no padding. The
projections are packed (q/k/v -> qkv_proj, gate/up -> gate_up_proj) so each layer runs two big matmuls
instead of five; ``load_weights`` maps checkpoint names onto the packed parameters.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from flotilla.engine.layers.activation import gated_activation
from flotilla.engine.layers.attention import PagedAttention
from flotilla.engine.layers.linear import (
    PackedColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, column_parts, load_whole)
from flotilla.engine.layers.moe import MoeSpec, SparseMoeBlock
from flotilla.engine.layers.norm import RMSNorm
from flotilla.engine.layers.rotary import RotaryEmbedding
from flotilla.engine.parallel import first_kv_head, kv_heads_per_rank, split_evenly


_GEMMA = ("gemma", "gemma2", "gemma3_text")
_SANDWICH = ("gemma2", "gemma3_text")  # a norm after attention and after the MLP too, before each residual add


def _rope_settings(config: Any, layer: int) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either the transformers 5 ``rope_parameters`` (per layer kind where the kinds differ,
    as Gemma 3's local and global layers do) or the older config fields."""
    params = getattr(config, "rope_parameters", None)
    kinds = getattr(config, "layer_types", None)
    if isinstance(params, dict) and kinds is not None and kinds[layer] in params:
        params = params[kinds[layer]]
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = params if params.get("rope_type", "default") != "default" else None
        return float(params["rope_theta"]), scaling
    scaling = getattr(config, "rope_scaling", None)
    if scaling and getattr(config, "original_max_position_embeddings", None):  # Phi-3 kept it beside rope_scaling
        scaling = {"original_max_position_embeddings": config.original_max_position_embeddings, **scaling}
    return float(getattr(config, "rope_theta", 10000.0)), scaling


def _rotary_dim(config: Any, head_dim: int) -> int:
    """How many features of each head RoPE turns: ``partial_rotary_factor`` of them (Phi-4-mini: 3/4), else all."""
    params = getattr(config, "rope_parameters", None)
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    factor = factor or getattr(config, "partial_rotary_factor", None) or 1.0
    return int(head_dim * factor)


def layer_window(config: Any, layer: int) -> int | None:
    """The attention window of ``layer``, if it has one. transformers lists each layer's kind in ``layer_types``
    (Gemma 2 alternates windowed and full layers, Gemma 3 has five windowed to one full, Qwen2/3 window the layers
    past ``max_window_layers`` when ``use_sliding_window``); without it a window applies to every layer (Mistral
    v0.1's 4096)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    kinds = getattr(config, "layer_types", None)
    if kinds is not None and kinds[layer] != "sliding_attention":
        return None
    return int(window)


def projection_rows(config: Any) -> dict[str, int]:
    """Output rows of each packed part of a decoder layer's projections, whole (before any tensor-parallel split):
    q, k, v and the dense MLP's gate and up."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return {"q": heads * head_dim, "k": kv, "v": kv, "gate": config.intermediate_size, "up": config.intermediate_size}


def _norm_offset(config: Any) -> float:
    """Gemma stores each RMSNorm scale as ``w`` and multiplies by ``1 + w``."""
    return 1.0 if config.model_type in _GEMMA else 0.0


def _moe_spec(config: Any, layer: int) -> MoeSpec | None:
    """The sparse MLP of ``layer``, or None where the layer's MLP is dense. Mixtral: every layer, top-k weights
    always renormalised and kept in fp32. Qwen2/3-MoE: the layers past ``mlp_only_layers`` on every
    ``decoder_sparse_step``-th layer, renormalised only with ``norm_topk_prob``, weights in the activations' dtype;
    Qwen2-MoE adds a shared expert."""
    if config.model_type == "mixtral":
        return MoeSpec(config.num_local_experts, config.num_experts_per_tok, config.intermediate_size,
                       renormalize=True, round_weights=False)
    if config.model_type in ("qwen2_moe", "qwen3_moe"):
        step = getattr(config, "decoder_sparse_step", 1) or 1
        if (config.num_experts <= 0 or layer in (getattr(config, "mlp_only_layers", None) or [])
                or (layer + 1) % step):
            return None
        return MoeSpec(config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                       renormalize=bool(getattr(config, "norm_topk_prob", False)), round_weights=True,
                       shared_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0) or 0)
    return None


class LlamaAttention(nn.Module):
    """Heads split across tensor-parallel ranks: each rank projects, rotates and attends its own query heads
    against its KV heads; o_proj's all-reduce sums the ranks' outputs. The decoder layer runs the three in turn
    (``project``, ``attn``, ``o_proj``)."""

    def __init__(self, config: Any, layer: int) -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.num_heads = split_evenly(total_heads, "num_attention_heads")
        self.num_kv_heads = kv_heads_per_rank(total_kv)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        qkv_bias = getattr(config, "qkv_bias", None)  # Qwen2-MoE names it; Qwen2 has q/k/v biases implicitly
        if qkv_bias is None:
            qkv_bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        o_bias = bool(getattr(config, "attention_bias", False)) and config.model_type != "qwen2"
        q_rows = column_parts({"q": total_heads * self.head_dim})["q"]
        kv_start = first_kv_head(total_kv) * self.head_dim
        self.qkv_proj = PackedColumnParallelLinear(config.hidden_size, {
            "q": q_rows, "k": (kv_start, kv_size), "v": (kv_start, kv_size)}, bias=qkv_bias)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=o_bias)
        theta, scaling = _rope_settings(config, layer)
        # the served context (``flotilla_max_model_len``, set by the engine) picks LongRoPE's factor set
        self.rotary = RotaryEmbedding(self.head_dim, config.max_position_embeddings, theta, scaling,
                                      _rotary_dim(config, self.head_dim), getattr(config, "flotilla_max_model_len",
                                                                                  None))
        # Gemma 2/3 scale queries by query_pre_attn_scalar^-0.5 and Gemma 2 soft-caps the scores.
        scale = (getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, scale,
                                   sliding_window=layer_window(config, layer),
                                   softcap=getattr(config, "attn_logit_softcapping", None))
        # Qwen3 and Gemma 3 normalise each head's query and key (one RMSNorm over head_dim, shared by the heads)
        # before RoPE.
        self.q_norm = self.k_norm = None
        if config.model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, _norm_offset(config))
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, _norm_offset(config))

    def project(self, positions: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the attention reads: ``q`` ``[T, H, D]`` (normalised and rotated), ``k`` ``[T, KVH, D]`` (the same)
        and ``v`` ``[T, KVH, D]``."""
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim))
            k = self.k_norm(k.reshape(-1, self.head_dim))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return q, k, v.reshape(-1, self.num_kv_heads, self.head_dim)


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, intermediate_size: int | None = None) -> None:
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = PackedColumnParallelLinear(config.hidden_size, column_parts({"gate": inter, "up": inter}),
                                                       bias=bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)
        self.act_and_mul = gated_activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, index: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, index)
        moe = _moe_spec(config, index)
        if moe is None:
            self.mlp: nn.Module = LlamaMLP(config)
        else:
            shared = LlamaMLP(config, moe.shared_intermediate_size) if moe.shared_intermediate_size else None
            self.mlp = SparseMoeBlock(config.hidden_size, moe, gated_activation(config), shared)
        offset = _norm_offset(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset)
        self.sandwich = config.model_type in _SANDWICH
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset)

    # A layer is two pieces around its attention, so that a piecewise CUDA graph (cuda_graphs.py) can capture
    # everything but the attention: ``before_attention`` up to the attention's inputs, ``after_attention`` from its
    # output. ``x`` is the previous layer's output not yet added to the ``residual`` stream; each norm that follows
    # an add does the add (fused).

    def before_attention(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v, residual)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        return (*self.self_attn.project(positions, x), residual)

    def after_attention(self, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, residual) from the attention's output ``[T, H * D]``."""
        x = self.self_attn.o_proj(attn)
        if self.sandwich:  # Gemma 2/3: norm(attn) + residual, norm before the MLP, norm(mlp) + residual
            x, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(x), residual)
            return self.post_feedforward_layernorm(self.mlp(x)), residual
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, residual = self.before_attention(positions, x, residual)
        return self.after_attention(self.self_attn.attn(q, k, v), residual)


# A checkpoint's per-expert tensor (Mixtral's w1/w3/w2 under block_sparse_moe, Qwen's gate/up/down_proj under mlp)
_EXPERT_WEIGHT = re.compile(r"\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (packed parameter fragment, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, _norm_offset(config))
        # Gemma scales the embeddings by sqrt(hidden_size), rounded to the serving dtype (the default dtype while the
        # model is built) as transformers rounds it; a buffer, so no forward pass (nor a CUDA graph) makes a tensor.
        scale = None
        if config.model_type in _GEMMA:
            scale = torch.tensor(config.hidden_size**0.5, dtype=torch.float32).to(torch.get_default_dtype())
        self.register_buffer("embed_scale", scale, persistent=False)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2: cap * tanh(logits / cap)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        # A bare decoder ("Qwen3Model", "MistralModel": embedding models) has no LM head and computes no logits.
        self.has_lm_head = not (getattr(config, "architectures", None) or ["ForCausalLM"])[0].endswith("Model")
        if self.tie_word_embeddings or not self.has_lm_head:
            self.lm_head = None
        else:  # the same vocabulary split as the embedding
            self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size)

    @property
    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x if self.embed_scale is None else x * self.embed_scale

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(x, residual)[0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[num_tokens, hidden]`` of every token; ``compute_logits`` picks the rows to sample."""
        x, residual = self.embed(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.final_norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary, on every rank (gathered from the ranks' vocabulary shards)."""
        if not self.has_lm_head:
            raise ValueError(f"{self.config.architectures[0]} has no language-model head: it computes no logits")
        logits = (self.embed_tokens if self.lm_head is None else self.lm_head).logits(hidden)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _unfused(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoints that store q/k/v or gate/up already fused (Phi-3's ``qkv_proj``, ``gate_up_proj``) as the
        separate tensors the packed layers load, each then split across tensor-parallel ranks as usual."""
        rows = projection_rows(self.config)
        parts = {"qkv_proj": (("q_proj", rows["q"]), ("k_proj", rows["k"]), ("v_proj", rows["v"])),
                 "gate_up_proj": (("gate_proj", rows["gate"]), ("up_proj", rows["up"]))}
        for name, tensor in weights:
            fused = next((f for f in parts if f".{f}." in name), None)
            if fused is None:
                yield name, tensor
                continue
            sizes = [size for _, size in parts[fused]]
            if tensor.shape[0] != sum(sizes):
                raise ValueError(f"{name}: {tensor.shape[0]} rows, expected {sum(sizes)} ({fused} fused)")
            for (piece, _), chunk in zip(parts[fused], tensor.split(sizes, dim=0)):
                yield name.replace(fused, piece), chunk

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) into the parameters; returns the names loaded.
        Raises if a parameter is left unloaded, so a mismatched checkpoint fails loudly."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in self._unfused(weights):
            if "rotary_emb.inv_freq" in name:
                continue
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            name = name.replace(".block_sparse_moe.", ".mlp.")
            target, shard = name, None
            expert = _EXPERT_WEIGHT.search(name)
            if expert is not None:
                part = _EXPERT_PART[expert.group(2)]
                target = name[:expert.start()] + (".experts.w2" if part == "down" else ".experts.w13")
                shard = f"{expert.group(1)}.{part}"
            else:
                for fragment, (packed, shard_id) in self.packed_modules.items():
                    if f".{fragment}." in name:
                        target, shard = name.replace(fragment, packed), shard_id
                        break
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
            param = params[target]
            with torch.no_grad():
                try:  # each parameter takes its own (tensor-parallel) part of the checkpoint tensor
                    getattr(param, "weight_loader", load_whole)(param, tensor, shard)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
            loaded.add(f"{target}:{shard}" if shard else target)
        missing = {n for n, p in params.items()  # a packed parameter needs every one of its parts
                   if not all(f"{n}:{s}" in loaded for s in getattr(p, "shards", ()))
                   or (not hasattr(p, "shards") and n not in loaded)}
        if missing:
            raise ValueError(f"checkpoint lacks tensors for: {sorted(missing)[:8]}")
        return loaded
