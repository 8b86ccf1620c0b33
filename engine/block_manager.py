"""The KV-cache block pool: allocation, reference counts and content-addressed prefix reuse.

Pure Python bookkeeping over block ids; the tensors live in the model runner. Every full block whose K/V
has been computed is named by a hash chain (parent hash, its token ids, and the request's cache salt on
the first block), so a later request with the same prefix reuses the blocks instead of recomputing
them. Blocks with no owner stay cached in an LRU free queue and are evicted only when the pool needs them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from flotilla.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


def hash_block(parent: bytes | None, token_ids: list[int], salt: str | None) -> bytes:
    h = hashlib.sha256(parent or b"root")
    if parent is None and salt:
        h.update(b"salt:" + salt.encode())
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first: the order of eviction.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        # Statistics in tokens, as vLLM's prefix-cache metrics count them.
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix reuse -------------------------------------------------------------------------------

    def match_prefix(self, request: Request) -> list[int]:
        """Cached blocks holding the longest prefix of the request's tokens. At least one token is always
        left to compute, since its logits are needed to sample."""
        # Prompt logprobs need every prompt position computed, so such requests skip the cache (as in vLLM).
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        hits: list[int] = []
        parent: bytes | None = None
        for i in range(max_blocks):
            parent = hash_block(parent, tokens[i * self.block_size:(i + 1) * self.block_size], request.prefix_salt)
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def cache_full_blocks(self, request: Request) -> None:
        """Name the request's newly completed blocks so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        tokens = request.all_token_ids
        for i in range(len(request.block_hashes), num_full):
            parent = request.block_hashes[-1] if request.block_hashes else None
            block_hash = hash_block(parent, tokens[i * self.block_size:(i + 1) * self.block_size], request.prefix_salt)
            request.block_hashes.append(block_hash)
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None and block_hash not in self._cached:
                block.block_hash = block_hash
                self._cached[block_hash] = block.block_id

    # ---- allocation ---------------------------------------------------------------------------------

    def allocate(self, request: Request, num_new_tokens: int, prefix_blocks: list[int] | None = None) -> bool:
        """Grow the request's block table to hold ``num_computed_tokens (+ prefix) + num_new_tokens``
        tokens. All or nothing: returns False, changing nothing, when the pool cannot supply the blocks."""
        prefix_blocks = prefix_blocks or []
        total = request.num_computed_tokens + len(prefix_blocks) * self.block_size + num_new_tokens
        new = self.blocks_needed(total) - len(request.block_ids) - len(prefix_blocks)
        # Reusing a cached block that nobody holds takes it off the free queue too.
        revived = sum(1 for b in prefix_blocks if self.blocks[b].ref_count == 0)
        if new + revived > len(self._free):
            return False
        if self.enable_prefix_caching and not request.block_ids and request.num_computed_tokens == 0:
            # admission (not a swap-in): count the lookup once
            self.prefix_queries += request.num_tokens
            self.prefix_hits += len(prefix_blocks) * self.block_size
        for b in prefix_blocks:
            self._take(b)
        request.block_ids.extend(prefix_blocks)
        if prefix_blocks:
            request.num_computed_tokens += len(prefix_blocks) * self.block_size
            request.metrics.num_cached_tokens = len(prefix_blocks) * self.block_size
            # The matched blocks are named already: record their hashes so the chain continues.
            request.block_hashes = [self.blocks[b].block_hash for b in prefix_blocks]  # type: ignore[misc]
        for _ in range(max(new, 0)):
            request.block_ids.append(self._pop_free())
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so the tail is evicted before the shared head."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        request.block_ids = []
        request.block_hashes = []

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its content is about to be overwritten
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                block.block_hash = None
        self._cached = {h: b for h, b in self._cached.items() if self.blocks[b].block_hash == h}

    def check_integrity(self) -> None:
        """Raise unless every block is either held (ref_count > 0) or free, exactly once."""
        free = set(self._free)
        for block in self.blocks:
            if block.ref_count < 0 or (block.ref_count == 0) != (block.block_id in free):
                raise AssertionError(f"block {block.block_id}: ref_count {block.ref_count}, free={block.block_id in free}")


class SwapPool:
    """Host-memory blocks that hold preempted requests' K/V under ``preemption_mode="swap"``. Plain
    bookkeeping like the device pool, without sharing or caching: a swapped request owns its blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        if len(set(block_ids) | set(self._free)) != len(block_ids) + len(self._free):
            raise RuntimeError("swap block freed twice")
        self._free.extend(reversed(block_ids))
