"""The compiled CPU kernels (``kernels/csrc``, built by ``cpu_build``) with the torch references' signatures and
layouts, which stay their oracles:

- paged attention (``flotilla.kernels.paged_attention``): one pass over each sequence's paged K/V with an online
  softmax, every query head of a GQA group and every query token of a prefill tile served from the same K/V rows;
- the decoder's elementwise ops (``flotilla.kernels.elementwise``): RMSNorm with its residual add, rotary
  embedding, SiLU-and-mul, one pass each.

``load`` must succeed before the ops are called; it finds a library already built for this source, torch and
CPU level (a prebuilt folder such as the CPU image's, then the cache) or builds one into the cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from flotilla.kernels import cpu_build

log = logging.getLogger(__name__)

_library: Path | None = None


def load(cache_dir: Path, prebuilt_dirs: list[Path] = ()) -> Path:
    """Load the library (building it into ``cache_dir`` when no folder has it); raises ``cpu_build.BuildError``
    with one line when it cannot be built or loaded."""
    global _library
    if _library is not None:
        return _library
    path = cpu_build.find([*prebuilt_dirs, cache_dir])
    if path is None:
        log.info("building the CPU attention kernels into %s (once per torch version and CPU level)", cache_dir)
        path = cpu_build.build(cache_dir)
    try:
        torch.ops.load_library(str(path))
    except OSError as e:
        raise cpu_build.BuildError(f"cannot load {path}: {e}") from e
    _library = path
    return path


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    torch.ops.flotilla_cpu.write_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale) -> torch.Tensor:
    one_each = torch.arange(query.shape[0] + 1, dtype=torch.int32)
    return paged_attention(query, k_cache, v_cache, block_tables, seq_lens, one_each, scale)


def paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale) -> torch.Tensor:
    """The one-pass kernel for any spans of new tokens (decode is one token per sequence)."""
    return torch.ops.flotilla_cpu.paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                                  scale)


def rms_norm(x, weight, eps, residual=None):
    """``elementwise.rms_norm_ref``'s contract (rows are the last dimension)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if residual is None:
        return torch.ops.flotilla_cpu.rms_norm(x2, weight, eps).view(shape)
    normed, summed = torch.ops.flotilla_cpu.fused_add_rms_norm(x2, residual.reshape(-1, shape[-1]), weight, eps)
    return normed.view(shape), summed.view(shape)


def rotary_embedding(positions, q, k, cos, sin):
    """``elementwise.rotary_embedding_ref``'s contract; ``q`` and ``k`` are rotated in place and returned."""
    torch.ops.flotilla_cpu.rotary_embedding(positions, q, k, cos, sin)
    return q, k


def silu_and_mul(x):
    """``elementwise.silu_and_mul_ref``'s contract."""
    shape = x.shape
    out = torch.ops.flotilla_cpu.silu_and_mul(x.reshape(-1, shape[-1]))
    return out.view(*shape[:-1], shape[-1] // 2)
