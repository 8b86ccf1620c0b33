"""The attention backend interface and the per-step attention metadata.

Layers never see the scheduler: the model runner builds one ``AttentionMetadata`` per forward pass and
installs it with ``forward_context``; each attention layer reads it from there. The context manager
refuses nesting, so metadata can never leak from one step into the next.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from flotilla.kernels import dispatch
from flotilla.kernels import paged_attention as ref

# Environment override for ``select_backend``: torch | triton (auto when unset).
BACKEND_ENV = "FLOTILLA_ATTENTION_BACKEND"


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the paged cache. Decode sequences (one new token each) come first
    in the flattened batch, then prefill spans (prompt chunks, possibly after cached context)."""

    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]
    decode_seq_lens: torch.Tensor  # [num_decodes]
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks]
    prefill_seq_lens: torch.Tensor  # [num_prefills]
    prefill_query_start_loc: torch.Tensor  # [num_prefills + 1], offsets within the prefill tokens
    prefill_has_context: bool  # some prefill span continues earlier cached tokens


class AttentionBackend(Protocol):
    """What an attention implementation provides. Triton kernels on CUDA and the torch references on the
    CPU implement the same calls with the same tensor layouts (see ``flotilla.kernels.paged_attention``)."""

    name: str

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None: ...

    def decode(self, query, k_cache, v_cache, block_tables, seq_lens, scale) -> torch.Tensor: ...

    def prefill_paged(
        self, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale
    ) -> torch.Tensor: ...

    def prefill_fresh(self, query, key, value, query_start_loc, scale) -> torch.Tensor: ...


class TorchReferenceBackend:
    """Plain PyTorch: the CPU path and the oracle the Triton kernels are tested against."""

    name = "torch"

    write_kv = staticmethod(ref.write_kv_cache_ref)
    decode = staticmethod(ref.paged_decode_attention_ref)
    prefill_paged = staticmethod(ref.paged_prefill_attention_ref)
    prefill_fresh = staticmethod(ref.varlen_causal_attention_ref)


class TritonBackend:
    """Triton kernels (``flotilla.kernels.triton_*``): the CUDA path. Also runs on CPU tensors under
    ``TRITON_INTERPRET=1``, which is how the CPU suite checks it against ``TorchReferenceBackend``."""

    name = "triton"

    def __init__(self) -> None:
        # Imported here: triton is a Linux-only dependency and the torch path must not need it.
        from flotilla.kernels import triton_cache, triton_paged_attention

        self.write_kv = triton_cache.write_kv_cache
        self.decode = triton_paged_attention.paged_decode_attention
        self.prefill_paged = triton_paged_attention.paged_prefill_attention
        self.prefill_fresh = triton_paged_attention.varlen_causal_attention


def select_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    """The one place that picks an implementation: Triton on CUDA, the torch reference elsewhere.
    ``name`` (``auto``/``torch``/``triton``) or the ``FLOTILLA_ATTENTION_BACKEND`` environment variable
    overrides the choice; forcing Triton off CUDA needs ``TRITON_INTERPRET=1``."""
    if dispatch.resolve(device, name, BACKEND_ENV) == "triton":
        return TritonBackend()
    return TorchReferenceBackend()


_current: AttentionMetadata | None = None


@contextlib.contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[AttentionMetadata]:
    global _current
    if _current is not None:
        raise RuntimeError("forward_context is already active: nested forward passes are not allowed")
    _current = metadata
    try:
        yield metadata
    finally:
        _current = None


def get_forward_context() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("attention called outside forward_context")
    return _current
