"""KV-cache maintenance: torch references (the CPU path and the oracle for ``triton_cache``).

Writing new tokens' K/V lives with the attention references (``paged_attention.write_kv_cache_ref``);
this module owns whole-block copies, which swap-in/out and copy-on-write of shared prefix blocks need.
"""

from __future__ import annotations

import torch


def copy_blocks_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy whole blocks within one layer's cache: for each row ``(src, dst)`` of ``block_mapping``
    ``[num_pairs, 2]``, ``cache[dst] = cache[src]`` for K and V. Destinations must be distinct and must not be sources:
    the Triton twin copies pairs in no particular order."""
    if block_mapping.numel() == 0:
        return
    src, dst = block_mapping[:, 0].long(), block_mapping[:, 1].long()
    k_cache[dst] = k_cache[src]
    v_cache[dst] = v_cache[src]
