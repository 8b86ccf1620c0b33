"""Adapter slots on the model's projections, and the per-step grouping the projections read.

``attach`` gives every adaptable projection (q/k/v and gate/up, packed; o and down) a ``LoRALayer``: the stacked
``A``/``B`` of ``max_loras`` slots in the serving dtype, zero until an adapter is loaded into a slot. The linear
layers call it after their own product (``linear.py``), before a row-parallel layer's all-reduce: a rank's share of
``x @ Aᵀ @ Bᵀ`` sums over ranks like the base product does, so the adapter costs no extra communication. Column
layers keep ``A`` whole and take their rows of ``B``; row layers take their columns of ``A`` and keep ``B`` whole.

The model runner installs each step's ``LoRABatch`` with ``lora_step``; without one (a step with no adapter, a
captured CUDA graph) a projection computes the base model alone.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from flotilla.engine.layers.linear import PackedColumnParallelLinear, RowParallelLinear
from flotilla.engine.lora.adapter import LoRAAdapter, Target
from flotilla.engine.models.llama import projection_rows
from flotilla.engine.parallel import tp
from flotilla.kernels.lora import LoRABatch, lora_expand, lora_shrink

_STEP: LoRABatch | None = None


@contextlib.contextmanager
def lora_step(batch: LoRABatch | None) -> Iterator[None]:
    global _STEP
    if _STEP is not None:
        raise RuntimeError("lora_step: already inside a step")
    _STEP = batch
    try:
        yield
    finally:
        _STEP = None


class LoRALayer:
    def __init__(self, base: nn.Module, target: Target, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.target = target
        self.rank = max_rank
        if isinstance(base, RowParallelLinear):
            self.in_start, in_local = tp().rank * base.local_in, base.local_in
            # (part, first checkpoint row, rows, first output column)
            self.parts = [(None, 0, target.parts[None], 0)]
            out = target.parts[None]
        else:
            self.in_start, in_local = 0, target.in_features
            self.parts = [(p, start, rows, base.offsets[p]) for p, (start, rows) in base.parts.items()]
            out = sum(rows for _, _, rows, _ in self.parts)
        self.a = torch.zeros(max_loras, len(self.parts) * max_rank, in_local, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, out, max_rank, dtype=dtype, device=device)

    def set_slot(self, slot: int, adapter: LoRAAdapter | None, path: str) -> None:
        """Copy this rank's share of the adapter's weights for this projection into ``slot`` (zeros where the
        adapter leaves a part alone, or with no adapter)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        weights = {} if adapter is None else adapter.weights.get(path, {})
        r = self.rank
        for i, (part, start, rows, offset) in enumerate(self.parts):
            if part not in weights:
                continue
            a, b = weights[part]
            rank = a.shape[0]
            self.a[slot, i * r:i * r + rank] = a[:, self.in_start:self.in_start + self.a.shape[2]]
            self.b[slot, offset:offset + rows, :rank] = b[start:start + rows]

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        batch = _STEP
        if batch is None:
            return out
        y = lora_shrink(x, self.a, batch)
        for i, (_, _, rows, offset) in enumerate(self.parts):
            lora_expand(y, self.b[:, offset:offset + rows], batch, out, i * self.rank, offset)
        return out


def targets(config: Any, model: nn.Module) -> dict[str, Target]:
    """The adaptable projections of a Llama-family model, unsharded: path -> input width and part rows."""
    rows, hidden = projection_rows(config), config.hidden_size
    found: dict[str, Target] = {}
    for i, layer in enumerate(model.layers):
        found[f"layers.{i}.self_attn.qkv_proj"] = Target(hidden, {p: rows[p] for p in ("q", "k", "v")})
        found[f"layers.{i}.self_attn.o_proj"] = Target(rows["q"], {None: hidden})
        if isinstance(getattr(layer.mlp, "gate_up_proj", None), PackedColumnParallelLinear):  # a dense MLP (a
            found[f"layers.{i}.mlp.gate_up_proj"] = Target(hidden, {p: rows[p] for p in ("gate", "up")})  # mixture
            found[f"layers.{i}.mlp.down_proj"] = Target(rows["gate"], {None: hidden})  # of experts takes no LoRA)
    return found


def attach(model: nn.Module, config: Any, max_loras: int, max_rank: int, dtype: torch.dtype,
           device: torch.device) -> dict[str, LoRALayer]:
    """Give each adaptable projection its slots (``layer.lora``); returns them by path."""
    layers = {}
    modules = dict(model.named_modules())
    for path, target in targets(config, model).items():
        base = modules[path]
        base.lora = layers[path] = LoRALayer(base, target, max_loras, max_rank, dtype, device)
    return layers
