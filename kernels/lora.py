"""Multi-LoRA: the batched gather-matmuls that apply many adapters to one batch (punica's shrink and expand), their
torch references, and the one dispatch point the LoRA layers call.

A step's tokens each use one adapter *slot* (or none, ``-1``). Every adapted projection holds its slots' weights
stacked: ``A`` ``[slots, N, K]`` and ``B`` ``[slots, N_out, R]`` (zero-padded to the largest rank, so a smaller
adapter adds nothing through its padding; the adapter's scaling is folded into ``B``). For token ``t`` in slot
``s``:

- ``lora_shrink``: ``y[t] = x[t] @ A[s].T`` — down to the rank (every packed part's ``A`` at once:
  ``N = parts × R``);
  tokens with no adapter get zeros.
- ``lora_expand``: ``out[t, o:o+N_out] += y[t, r:r+R] @ B[s].T`` — back up, added into the base layer's output in
  place, one call per packed part (``o``: the part's first output column, ``r``: its first rank column).

``LoRABatch`` (built once per step by ``lora_batch``, pure) groups the tokens by slot: the torch path runs one GEMM
per slot present (the CPU path: oneDNN's GEMMs, and the common single-adapter step needs no gather), the Triton
kernels (``flotilla.kernels.triton_lora``, the CUDA path) one launch over every slot's segment.
``FLOTILLA_LORA_BACKEND=torch|triton`` overrides the choice (tests run Triton on the CPU under the interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flotilla.kernels import dispatch

LORA_ENV = "FLOTILLA_LORA_BACKEND"


@dataclass
class LoRABatch:
    """Which slot each of a step's tokens uses, grouped by slot."""

    #: (slot, first, end) into ``sorted_tokens``, one per slot present, in slot order
    segments: list[tuple[int, int, int]]
    #: the tokens that use an adapter, grouped by slot (int32, on the device)
    sorted_tokens: torch.Tensor
    #: ``[segments + 1]`` each segment's first index into ``sorted_tokens``, then the end (int32, on the device)
    seg_starts: torch.Tensor
    #: ``[segments]`` each segment's slot (int32, on the device)
    seg_slots: torch.Tensor
    #: the slot of every token when they all use the same one (no gather needed), else None
    uniform: int | None
    #: per segment, its tokens as a device index tensor (the torch path's gathers)
    rows: list[torch.Tensor]
    #: the torch path computes every slot present for every token at once (see ``lora_batch``)
    dense: bool = False
    #: with ``dense``: the slots present, and each (token, its index among them) (0 for a base token, then masked)
    present: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    present_index: torch.Tensor | None = None
    #: with ``dense``: ``[T, 1]``, 1 for a token with an adapter, 0 for a base token (None: every token has one)
    adapter_mask: torch.Tensor | None = None


# The torch path's choice: with this many slots present or more, and tokens few enough that multiplying every token by
# every present slot's weights (one GEMM) costs less than one small GEMM per slot (each a gather, a product and a
# scatter, ~11 per decoder layer), the products are dense. Measured on SmolLM2-135M (benchmarks/lora.py).
DENSE_MIN_SLOTS = 3
DENSE_MAX_TOKENS = 512


def lora_batch(token_slots: list[int], device: torch.device | str) -> LoRABatch | None:
    """The step's grouping from each token's slot (``-1``: no adapter); None when no token uses one."""
    by_slot: dict[int, list[int]] = {}
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            by_slot.setdefault(slot, []).append(t)
    if not by_slot:
        return None
    segments, order, starts = [], [], [0]
    for slot in sorted(by_slot):
        tokens = by_slot[slot]
        segments.append((slot, len(order), len(order) + len(tokens)))
        order.extend(tokens)
        starts.append(len(order))
    uniform = segments[0][0] if len(segments) == 1 and len(order) == len(token_slots) else None
    sorted_tokens = torch.tensor(order, dtype=torch.int32).to(device)
    batch = LoRABatch(
        segments=segments, sorted_tokens=sorted_tokens,
        seg_starts=torch.tensor(starts, dtype=torch.int32).to(device),
        seg_slots=torch.tensor([s for s, _, _ in segments], dtype=torch.int32).to(device),
        uniform=uniform, rows=[sorted_tokens[a:b].long() for _, a, b in segments])
    if len(segments) >= DENSE_MIN_SLOTS and len(token_slots) <= DENSE_MAX_TOKENS:
        where = {slot: i for i, (slot, _, _) in enumerate(segments)}
        batch.dense = True
        batch.present = torch.tensor(list(where), dtype=torch.long).to(device)
        batch.tokens = torch.arange(len(token_slots), device=device)
        batch.present_index = torch.tensor([where.get(s, 0) for s in token_slots], dtype=torch.long).to(device)
        if len(order) < len(token_slots):
            batch.adapter_mask = torch.tensor([[float(s >= 0)] for s in token_slots]).to(device)
    return batch


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """``[T, N]``: each token's ``x @ A[slot].T`` in ``x``'s dtype; zeros for tokens with no adapter."""
    if batch.uniform is not None:
        return F.linear(x, a[batch.uniform])
    if batch.dense:  # every token times every present slot's A, then each token's own block
        n = a.shape[1]
        every = F.linear(x, a.index_select(0, batch.present).reshape(-1, a.shape[2]))
        y = every.view(x.shape[0], -1, n)[batch.tokens, batch.present_index]
        return y if batch.adapter_mask is None else y * batch.adapter_mask.to(y.dtype)
    y = x.new_zeros(x.shape[0], a.shape[1])
    for (slot, _, _), rows in zip(batch.segments, batch.rows):
        y.index_copy_(0, rows, F.linear(x.index_select(0, rows), a[slot]))
    return y


def lora_expand_ref(y: torch.Tensor, b: torch.Tensor, batch: LoRABatch, out: torch.Tensor, y_offset: int = 0,
                    out_offset: int = 0) -> None:
    """``out[t, o:o+N] += y[t, r:r+R] @ B[slot].T`` in place, for each token with an adapter (``B``: ``[S, N, R]``,
    ``o``: ``out_offset``, ``r``: ``y_offset``)."""
    n, rank = b.shape[1], b.shape[2]
    target = out[:, out_offset:out_offset + n]
    if batch.uniform is not None:
        target += F.linear(y[:, y_offset:y_offset + rank], b[batch.uniform])
        return
    if batch.dense:  # each token's y in its slot's columns (zeros elsewhere) times every present slot's B
        tokens, present = y.shape[0], batch.present.shape[0]
        spread = y.new_zeros(tokens, present, rank)
        mine = y[:, y_offset:y_offset + rank]
        spread[batch.tokens, batch.present_index] = (
            mine if batch.adapter_mask is None else mine * batch.adapter_mask.to(y.dtype))
        weight = b.index_select(0, batch.present).permute(1, 0, 2).reshape(n, present * rank)
        target += F.linear(spread.view(tokens, present * rank), weight)
        return
    for (slot, _, _), rows in zip(batch.segments, batch.rows):
        target.index_add_(0, rows, F.linear(y.index_select(0, rows)[:, y_offset:y_offset + rank], b[slot]))


def _implementation(device: torch.device) -> str:
    return dispatch.resolve_cached(device.type, dispatch.env_override(LORA_ENV))


def lora_shrink(x: torch.Tensor, a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """``lora_shrink_ref``'s contract, on the implementation the dispatch rule picks."""
    if _implementation(x.device) == "triton":
        from flotilla.kernels.triton_lora import lora_shrink_triton

        return lora_shrink_triton(x, a, batch)
    return lora_shrink_ref(x, a, batch)


def lora_expand(y: torch.Tensor, b: torch.Tensor, batch: LoRABatch, out: torch.Tensor, y_offset: int = 0,
                out_offset: int = 0) -> None:
    """``lora_expand_ref``'s contract, on the implementation the dispatch rule picks."""
    if _implementation(out.device) == "triton":
        from flotilla.kernels.triton_lora import lora_expand_triton

        lora_expand_triton(y, b, batch, out, y_offset, out_offset)
        return
    lora_expand_ref(y, b, batch, out, y_offset, out_offset)
