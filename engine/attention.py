"""The attention backend interface and the per-step attention metadata.

Layers never see the scheduler: the model runner builds one ``AttentionMetadata`` per forward pass and
installs it with ``forward_context``; each attention layer reads it from there. The context manager
refuses nesting, so metadata can never leak from one step into the next.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from flotilla.kernels import dispatch
from flotilla.kernels import paged_attention as ref

# Environment override for ``select_backend``: torch | triton | cpu (auto when unset).
BACKEND_ENV = "FLOTILLA_ATTENTION_BACKEND"
BACKENDS = ("auto", "torch", "triton", "cpu")

log = logging.getLogger(__name__)


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
    # True: fresh prompts too are attended from the paged cache (the layer has just written their K/V there)
    # through ``prefill_paged``; False: through ``prefill_fresh`` on the step's own K/V.
    prefill_from_cache: bool

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None: ...

    # Each attention call also takes the keyword options ``window`` and ``softcap`` (kernels/paged_attention.py).

    def decode(self, query, k_cache, v_cache, block_tables, seq_lens, scale, **options) -> torch.Tensor: ...

    def prefill_paged(
        self, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, **options
    ) -> torch.Tensor: ...

    def prefill_fresh(self, query, key, value, query_start_loc, scale, **options) -> torch.Tensor: ...


class TorchReferenceBackend:
    """Plain PyTorch: the CPU path and the oracle the Triton kernels are tested against."""

    name = "torch"
    prefill_from_cache = False

    write_kv = staticmethod(ref.write_kv_cache_ref)
    decode = staticmethod(ref.paged_decode_attention_ref)
    prefill_paged = staticmethod(ref.paged_prefill_attention_ref)
    prefill_fresh = staticmethod(ref.varlen_causal_attention_ref)


class TritonBackend:
    """Triton kernels (``flotilla.kernels.triton_*``): the CUDA path. Also runs on CPU tensors under
    ``TRITON_INTERPRET=1``, which is how the CPU suite checks it against ``TorchReferenceBackend``."""

    name = "triton"
    prefill_from_cache = False

    def __init__(self) -> None:
        # Imported here: triton is a Linux-only dependency and the torch path must not need it.
        from flotilla.kernels import triton_cache, triton_paged_attention

        self.write_kv = triton_cache.write_kv_cache
        self.decode = triton_paged_attention.paged_decode_attention
        self.prefill_paged = triton_paged_attention.paged_prefill_attention
        self.prefill_fresh = triton_paged_attention.varlen_causal_attention


class CompiledCpuBackend:
    """C++ kernels (``flotilla.kernels.cpu_ops``), the CPU path: cache writes, and attention in one pass over each
    sequence's paged K/V for decodes and prefill spans alike (fresh prompts are read back from the cache: the
    kernel is several times faster there than per-sequence ``scaled_dot_product_attention``)."""

    name = "cpu"
    prefill_from_cache = True

    def __init__(self) -> None:
        from flotilla.kernels import cpu_ops

        load_cpu_kernels()
        self.write_kv = cpu_ops.write_kv_cache
        self._decode = cpu_ops.paged_decode_attention
        self._prefill = cpu_ops.paged_attention
        self.prefill_fresh = ref.varlen_causal_attention_ref  # unused: prefill_from_cache

    # The compiled kernels have no sliding window or soft-capping yet: layers with either take the torch reference.

    def decode(self, query, k_cache, v_cache, block_tables, seq_lens, scale, *, window=None, softcap=None):
        if window is None and softcap is None:
            return self._decode(query, k_cache, v_cache, block_tables, seq_lens, scale)
        return ref.paged_decode_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, scale, window=window,
                                              softcap=softcap)

    def prefill_paged(self, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, *, window=None,
                      softcap=None):
        if window is None and softcap is None:
            return self._prefill(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
        return ref.paged_prefill_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                               scale, window=window, softcap=softcap)


def load_cpu_kernels() -> Path:
    """The compiled CPU kernels, loaded: prebuilt (``FLOTILLA_CACHE_PREBUILT``/kernels, the CPU image's) or built
    once into Flotilla's cache (``FLOTILLA_CACHE``/kernels). Raises ``BuildError`` with one line."""
    from flotilla.engine.model_source import cache_root, prebuilt_cache_roots
    from flotilla.kernels import cpu_ops

    return cpu_ops.load(cache_root() / "kernels", [p / "kernels" for p in prebuilt_cache_roots()])


def _compiled_cpu(required: bool) -> AttentionBackend:
    from flotilla.kernels.cpu_build import BuildError

    try:
        return CompiledCpuBackend()
    except BuildError as e:
        if required:
            raise ValueError(f"the cpu attention backend was asked for but {e}") from e
        log.warning("CPU attention kernels unavailable (%s): using the slower torch path", e)
        return TorchReferenceBackend()


def select_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    """The one place that picks an implementation: Triton on CUDA, the compiled CPU kernels on the CPU (the
    torch reference, with a warning, where they cannot be built). ``name`` (``auto``/``torch``/``triton``/
    ``cpu``) or the ``FLOTILLA_ATTENTION_BACKEND`` environment variable overrides the choice; forcing Triton
    off CUDA needs ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    if name == "auto":
        name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"the cpu attention backend runs on CPU tensors, not {device}")
    if name == "cpu" or (name == "auto" and device.type == "cpu"):
        return _compiled_cpu(required=name == "cpu")
    if dispatch.resolve(device, name) == "triton":
        return TritonBackend()
    return TorchReferenceBackend()


def block_unused_triton() -> None:
    """For a process entry point (``flotilla serve``, a tensor-parallel worker): when no kernel can run on Triton
    here, it is never loaded (see ``dispatch.block_triton_if_unused``)."""
    from flotilla.kernels.elementwise import ELEMENTWISE_ENV

    dispatch.block_triton_if_unused((BACKEND_ENV, ELEMENTWISE_ENV))


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
