"""Megatron-style sharded layers. Each parameter carries a ``weight_loader(param, tensor, shard)`` that takes the
checkpoint's whole tensor and copies in this rank's part, so model code never does sharding arithmetic itself.

- ``PackedColumnParallelLinear``: output rows split across ranks, no communication. Packed projections (q/k/v,
  gate/up) are split part by part, so a rank's weight is ``[q_r; k_r; v_r]``; each part says which checkpoint rows
  this rank takes (KV heads may be replicated when ranks outnumber them).
- ``RowParallelLinear``: input columns split; partial outputs summed with one all-reduce, then the bias.
- ``VocabParallelEmbedding`` / ``lm_logits``: vocabulary rows split; lookups all-reduced, logits all-gathered.
With one rank every layer holds the whole weight and computes exactly what ``nn.Linear`` / ``nn.Embedding`` do.

On the CPU, ``pack_for_cpu`` moves every projection's weight, once loaded, into oneDNN's blocked layout and the layers
multiply with oneDNN's matmul (the op torch's own CPU compiler emits): 1.3-1.9x aten's ``linear`` here at decode and
prefill sizes (benchmarks/BENCHMARKS.md). The plain weight is dropped, so the weights are held once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flotilla.engine.parallel import all_gather_last, all_reduce, tp


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` in oneDNN's blocked layout, for ``torch.ops.mkldnn._linear_pointwise``; None where oneDNN cannot
    take it (not on the CPU, fp16, a torch build without oneDNN)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (RuntimeError, AttributeError):
        return None


def _matmul(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class _Packable(nn.Module):
    """A layer whose ``weight`` (``[out, in]``) may be replaced by its oneDNN-packed form on the CPU."""

    packed: torch.Tensor | None = None
    # adapter slots (engine/lora/layers.py): ``lora(x, out)`` adds this step's adapters' share to ``out``
    lora = None

    def pack_for_cpu(self, keep_weight: bool = False) -> bool:
        packed = _onednn_pack(self.weight)
        if packed is None:
            return False
        self.packed = packed
        if not keep_weight:  # an empty stand-in keeps the dtype and device the rest of the engine reads
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        return True


def pack_for_cpu(model: nn.Module) -> int:
    """Pack every projection and LM head of a loaded model for oneDNN (see the module doc); the input embedding
    keeps its plain rows for lookups beside the packed copy that computes tied logits. Returns layers packed."""
    return sum(m.pack_for_cpu(keep_weight=isinstance(m, VocabParallelEmbedding) and name != "lm_head")
               for name, m in model.named_modules() if isinstance(m, _Packable))


def load_whole(param: torch.Tensor, loaded: torch.Tensor, shard: str | None = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape {tuple(loaded.shape)} != parameter {tuple(param.shape)}")
    param.data.copy_(loaded)


def with_loader(param: nn.Parameter, loader, shards: set[str] | None = None) -> nn.Parameter:
    """Attach the parameter's ``weight_loader``; ``shards``: the parts a checkpoint must supply (packed q/k/v, each
    expert's gate/up), each loaded by its own call, which ``load_weights`` checks are all there."""
    param.weight_loader = loader  # type: ignore[attr-defined]
    if shards is not None:
        param.shards = frozenset(shards)  # type: ignore[attr-defined]
    return param


class PackedColumnParallelLinear(_Packable):
    """``parts`` maps each packed part (``"q"``, ``"k"``, ...) to ``(first checkpoint row, rows)`` for this rank,
    in packing order."""

    def __init__(self, input_size: int, parts: dict[str, tuple[int, int]], bias: bool) -> None:
        super().__init__()
        self.parts = dict(parts)
        self.offsets: dict[str, int] = {}
        total = 0
        for name, (_, rows) in self.parts.items():
            self.offsets[name] = total
            total += rows
        self.weight = with_loader(nn.Parameter(torch.empty(total, input_size)), self._load, set(self.parts))
        self.bias = with_loader(nn.Parameter(torch.empty(total)), self._load, set(self.parts)) if bias else None

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard: str | None) -> None:
        if shard not in self.parts:
            raise ValueError(f"no packed part {shard!r} (parts: {list(self.parts)})")
        start, rows = self.parts[shard]
        if loaded.shape[0] < start + rows:
            raise ValueError(f"shard {shard}: checkpoint has {loaded.shape[0]} rows, this rank needs "
                             f"{start}..{start + rows}")
        param.data[self.offsets[shard]:self.offsets[shard] + rows].copy_(loaded[start:start + rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _matmul(x, self.weight, self.packed, self.bias)
        return out if self.lora is None else self.lora(x, out)


def column_parts(sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Even per-part split for this rank: part -> (first row, rows)."""
    t = tp()
    out = {}
    for name, size in sizes.items():
        if size % t.size:
            raise ValueError(f"{name} ({size} rows) is not divisible by --tensor-parallel-size {t.size}")
        rows = size // t.size
        out[name] = (t.rank * rows, rows)
    return out


class ReplicatedLinear(_Packable):
    """The whole weight on every rank (a MoE router: every rank must route every token the same way)."""

    def __init__(self, input_size: int, output_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(x, self.weight, self.packed)


class RowParallelLinear(_Packable):
    def __init__(self, input_size: int, output_size: int, bias: bool) -> None:
        super().__init__()
        t = tp()
        if input_size % t.size:
            raise ValueError(f"input size {input_size} is not divisible by --tensor-parallel-size {t.size}")
        self.local_in = input_size // t.size
        self.weight = with_loader(nn.Parameter(torch.empty(output_size, self.local_in)), self._load)
        # The bias is added once, after the sum over ranks.
        self.bias = with_loader(nn.Parameter(torch.empty(output_size)), load_whole) if bias else None

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard: str | None = None) -> None:
        start = tp().rank * self.local_in
        load_whole(param, loaded[:, start:start + self.local_in])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _matmul(x, self.weight, self.packed)
        if self.lora is not None:  # before the sum over ranks: each rank adds its share of the adapter's product
            out = self.lora(x, out)
        out = all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(_Packable):
    """Rows ``[rank × per_rank, (rank + 1) × per_rank)`` of the vocabulary (the last rank's tail is padding)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        t = tp()
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // t.size)
        self.start = t.rank * self.per_rank
        self.valid = max(0, min(self.per_rank, vocab_size - self.start))
        self.weight = with_loader(nn.Parameter(torch.zeros(self.per_rank, hidden_size)), self._load)

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard: str | None = None) -> None:
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(f"vocabulary of {loaded.shape[0]} rows, expected {self.vocab_size}")
        param.data[:self.valid].copy_(loaded[self.start:self.start + self.valid])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp().size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.valid)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ W.T`` over the whole vocabulary (every rank gets all of it)."""
        return all_gather_last(_matmul(hidden, self.weight, self.packed))[..., :self.vocab_size]
