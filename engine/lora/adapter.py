"""Reading a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into the engine's terms.

PEFT names each adapted module as transformers does (``...layers.3.self_attn.q_proj.lora_A.weight``: ``A`` is
``[r, in]``, ``B`` is ``[out, r]``) and adds ``scaling · B @ A`` to the module's weight, with ``scaling`` =
``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA; ``alpha_pattern`` and ``rank_pattern`` override it per
module). Here each module becomes the packed projection it lives in (``q_proj`` → part ``q`` of ``qkv_proj``; a
fused ``qkv_proj`` adapter, as Phi-3's, is split into its parts) with the scaling folded into ``B`` (fp32 on the
host; the slots hold the serving dtype). Everything an engine cannot apply is refused here, with the reason,
before any request uses it: DoRA, trained biases, ``modules_to_save``, embeddings, a rank over ``--max-lora-rank``,
a module the model does not have or whose shape does not fit.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

# PEFT's module name -> (the packed projection under the decoder layer, its part; "*": every part, fused)
MODULES = {
    "q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
    "v_proj": ("self_attn.qkv_proj", "v"), "qkv_proj": ("self_attn.qkv_proj", "*"),
    "o_proj": ("self_attn.o_proj", None),
    "gate_proj": ("mlp.gate_up_proj", "gate"), "up_proj": ("mlp.gate_up_proj", "up"),
    "gate_up_proj": ("mlp.gate_up_proj", "*"), "down_proj": ("mlp.down_proj", None),
}
_KEY = re.compile(r"(?:^|\.)(?P<module>layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<name>\w+))"
                  r"\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter the engine cannot serve; the message says why, in one line."""


@dataclass(frozen=True)
class Target:
    """One adaptable projection of the model: its input width and each part's output rows, unsharded."""

    in_features: int
    parts: dict[str | None, int]  # part -> output rows (None: an unpacked projection)


@dataclass
class LoRAAdapter:
    """An adapter on the host: per projection (``layers.3.self_attn.qkv_proj``), per part, ``(A [r, in], B [out, r])``
    in fp32 with the scaling folded into ``B``."""

    weights: dict[str, dict[str | None, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


def read_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{folder} has no adapter_config.json: it is not a PEFT adapter")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder}: a {config['peft_type']} adapter; only LoRA adapters are served")
    if config.get("use_dora"):
        raise AdapterError(f"{folder}: DoRA adapters (use_dora) are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{folder}: adapters that train biases (bias={config['bias']!r}) are not supported")
    if config.get("modules_to_save"):
        raise AdapterError(f"{folder}: modules_to_save ({', '.join(config['modules_to_save'])}) are whole "
                           "weights, not LoRA: merge them into the base model instead")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{folder}: fan_in_fan_out adapters (GPT-2's Conv1D layout) are not supported")
    return config


def _alpha(config: dict, module: str) -> float:
    """The module's lora_alpha: the last ``alpha_pattern`` key matching its name (as PEFT matches them), else the
    adapter's."""
    alpha = config.get("lora_alpha", 8)
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
    return float(alpha)


def load_adapter(folder: Path, targets: dict[str, Target], max_rank: int) -> LoRAAdapter:
    """Read and check an adapter against the model's ``targets`` (path -> Target); see the module doc."""
    from safetensors.torch import load_file

    config = read_config(folder)
    files = sorted(folder.glob("adapter_model*.safetensors"))
    if not files:
        bins = sorted(folder.glob("adapter_model*.bin"))
        raise AdapterError(f"{folder} has no adapter_model.safetensors" + (
            " (Flotilla does not load PyTorch .bin pickles: save the adapter with safe_serialization=True)"
            if bins else ""))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None or m["name"] not in MODULES:
            unsupported.append(key)
            continue
        pairs.setdefault((m["module"], m["name"]), {})[m["ab"]] = tensor
    if unsupported:
        raise AdapterError(f"{folder}: tensors for modules LoRA is not served on: {', '.join(sorted(unsupported)[:4])}"
                           " (served: the attention and MLP projections of the decoder layers)")
    if not pairs:
        raise AdapterError(f"{folder}: adapter_model.safetensors holds no LoRA weights")
    adapter = LoRAAdapter()
    for (module, name_), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{folder}: {module} has lora_{'A' if 'A' in ab else 'B'} without its pair")
        a, b = ab["A"].float(), ab["B"].float()
        rank = a.shape[0]
        if rank > max_rank:
            raise AdapterError(f"{folder}: {module} has rank {rank}, over --max-lora-rank {max_rank}: start the "
                               "engine with a larger --max-lora-rank")
        layer_path, part = MODULES[name_]
        path = f"layers.{module.split('.')[1]}.{layer_path}"
        target = targets.get(path)
        if target is None:
            raise AdapterError(f"{folder}: {module}: the model has no such projection (a mixture-of-experts MLP "
                               "takes no LoRA)" if "mlp" in layer_path else f"{folder}: {module}: no such layer")
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != target.in_features or b.shape[1] != rank:
            raise AdapterError(f"{folder}: {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a "
                               f"{target.in_features}-wide input: was it trained on another base model?")
        scaling = _alpha(config, module) / (math.sqrt(rank) if config.get("use_rslora") else rank)
        b = b * scaling
        split = list(target.parts.items()) if part == "*" else [(part, target.parts[part])]
        if b.shape[0] != sum(rows for _, rows in split):
            raise AdapterError(f"{folder}: {module}: B has {b.shape[0]} rows, the model's projection "
                               f"{sum(rows for _, rows in split)}: was it trained on another base model?")
        parts = adapter.weights.setdefault(path, {})
        for (p, _), chunk in zip(split, b.split([rows for _, rows in split], dim=0)):
            parts[p] = (a.contiguous(), chunk.contiguous())
    return adapter
