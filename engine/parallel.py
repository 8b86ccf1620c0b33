"""Tensor parallelism's process group: which rank this process is, how many ranks there are, and the collectives
the sharded layers need (an all-reduce after row-parallel layers, an all-gather of vocabulary-parallel logits).

One process (the default) is a group of one: every collective is the identity and every layer holds its whole
weight, so the single-process engine runs exactly the code it ran before tensor parallelism existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1


_STATE = TensorParallel()
_CPU_GROUP = None  # gloo group for plain-data messages when the tensors go over NCCL


def tp() -> TensorParallel:
    return _STATE


def init_tensor_parallel(rank: int, size: int, init_method: str, backend: str | None = None) -> None:
    """Join the group of `size` ranks (gloo on CPU, NCCL on CUDA unless `backend` says otherwise)."""
    global _STATE, _CPU_GROUP
    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel group is already running in this process; shut its engine down first")
    if size > 1:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
        _CPU_GROUP = dist.new_group(backend="gloo") if backend != "gloo" else None
    _STATE = TensorParallel(rank, size)


def destroy_tensor_parallel() -> None:
    global _STATE, _CPU_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE, _CPU_GROUP = TensorParallel(), None


def broadcast_plan(plan: Any) -> Any:
    """Rank 0 sends `plan` (plain, picklable data; None means stop); every other rank receives and returns it."""
    box = [plan if _STATE.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_CPU_GROUP)
    return box[0]


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's `value` (each rank's KV cache must hold what the scheduler hands out)."""
    if _STATE.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_CPU_GROUP)
    return int(t.item())


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place."""
    if _STATE.size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` along the last dimension, in rank order."""
    if _STATE.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def split_evenly(total: int, what: str) -> int:
    """This rank's share of `total` (heads, rows), which must divide evenly."""
    if total % _STATE.size:
        raise ValueError(f"{what} ({total}) is not divisible by --tensor-parallel-size {_STATE.size}")
    return total // _STATE.size


def kv_heads_per_rank(num_kv_heads: int) -> int:
    """KV heads each rank holds: its share, or one replicated head when there are more ranks than KV heads."""
    if num_kv_heads >= _STATE.size:
        return split_evenly(num_kv_heads, "num_key_value_heads")
    if _STATE.size % num_kv_heads:
        raise ValueError(f"--tensor-parallel-size {_STATE.size} is not a multiple of num_key_value_heads "
                         f"({num_kv_heads})")
    return 1


def first_kv_head(num_kv_heads: int) -> int:
    """The first KV head this rank holds (ranks that share a replicated head get the same one)."""
    if num_kv_heads >= _STATE.size:
        return _STATE.rank * kv_heads_per_rank(num_kv_heads)
    return _STATE.rank // (_STATE.size // num_kv_heads)
