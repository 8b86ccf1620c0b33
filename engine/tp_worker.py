"""Tensor-parallel workers: ranks 1..N-1 of an engine whose rank 0 is the engine process itself.

Rank 0 starts them (spawned, daemonic, and exiting by themselves if rank 0 dies: no orphans), they join its process
group, load their shard of the model, agree with rank 0 on the KV cache size (the minimum over ranks), then run
each step rank 0 broadcasts as a plain ``StepPlan`` — the same forward pass on their shard, the same collectives —
until an empty plan (shutdown) or a broken group (rank 0 gone) ends them. Rank 0 alone schedules and samples.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build the same model shard and cache as rank 0 (all picklable)."""

    size: int
    source: Any  # model_loader.ModelSource, resolved (downloaded) by rank 0
    dtype: torch.dtype
    device_type: str
    block_size: int
    seed: int
    kv_blocks_args: dict[str, Any] = field(default_factory=dict)
    swap_space_gib: float | None = None  # preemption_mode="swap": the same host cache on every rank
    max_model_len: int | None = None  # the served context, as rank 0's model reads it
    lora: tuple[int, int, int] | None = None  # (max_loras, max_lora_rank, max_cpu_loras) with enable_lora


def _die_with_parent() -> None:
    """Exit when rank 0 is gone, however it went (even SIGKILL): no orphan holds a GPU. Polled, because the
    kernel's PR_SET_PDEATHSIG fires when the parent *thread* exits, and rank 0 starts workers from a loader thread."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="flotilla-tp-parent-watch", daemon=True).start()


def device_for(rank: int, device_type: str) -> torch.device:
    return torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")


def cpu_threads(size: int) -> int:
    """Each rank's share of the cores (CPU tensor parallelism)."""
    return max(1, (os.cpu_count() or 1) // size)


class Workers:
    """Rank 0's handle on ranks 1..N-1: start, check they live, stop."""

    def __init__(self, spec: WorkerSpec) -> None:
        self._dir = tempfile.mkdtemp(prefix="flotilla-tp-")
        self.rendezvous = f"file://{os.path.join(self._dir, 'rendezvous')}"  # a file: no port to pick or lose
        context = multiprocessing.get_context("spawn")
        self.processes = [context.Process(target=worker_main, args=(rank, self.rendezvous, spec), daemon=True,
                                          name=f"flotilla-tp-rank{rank}")
                          for rank in range(1, spec.size)]
        for p in self.processes:
            p.start()

    def dead(self) -> list[str]:
        """Workers that exited, as 'rank R (exit code C)'."""
        return [f"rank {i + 1} (exit code {p.exitcode})" for i, p in enumerate(self.processes) if not p.is_alive()]

    def join(self, init: Any) -> None:
        """Run rank 0's side of the group's rendezvous, ``init(rendezvous)``, while watching the workers: one that
        dies before joining (a failed import, a model it cannot load) fails this at once instead of leaving
        rank 0 waiting out the rendezvous timeout."""
        done: list[BaseException | None] = []

        def run() -> None:
            try:
                init(self.rendezvous)
                done.append(None)
            except BaseException as e:  # handed to the caller below
                done.append(e)

        thread = threading.Thread(target=run, name="flotilla-tp-rendezvous", daemon=True)
        thread.start()
        while not done:
            if dead := self.dead():
                raise RuntimeError(f"tensor-parallel worker died while starting: {', '.join(dead)}")
            thread.join(timeout=0.2)
        if done[0] is not None:
            raise done[0]

    def kill(self) -> None:
        self.stop(timeout=0)

    def stop(self, timeout: float = 10.0) -> None:
        """Wait up to `timeout` seconds for each worker to exit (after a stop plan), then kill what is left."""
        for p in self.processes:
            p.join(timeout=timeout)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(self._dir, ignore_errors=True)


def worker_main(rank: int, rendezvous: str, spec: WorkerSpec) -> None:
    _die_with_parent()
    from flotilla.engine.attention import block_unused_triton
    from flotilla.engine.model_loader import load_config, load_model
    from flotilla.engine.model_runner import ModelRunner, host_cache_blocks, kv_cache_blocks
    from flotilla.engine.parallel import broadcast_plan, destroy_tensor_parallel, init_tensor_parallel, min_over_ranks

    block_unused_triton()
    device = device_for(rank, spec.device_type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cpu_threads(spec.size))
    init_tensor_parallel(rank, spec.size, rendezvous)
    try:
        config = load_config(spec.source)
        config.flotilla_max_model_len = spec.max_model_len
        torch.manual_seed(spec.seed)
        model = load_model(spec.source, config, spec.dtype, device, spec.seed)
        runner = ModelRunner(model, config, device, spec.dtype, spec.block_size, spec.seed)
        if spec.lora is not None:
            runner.enable_lora(*spec.lora)
        runner.allocate_kv_cache(min_over_ranks(kv_cache_blocks(runner, **spec.kv_blocks_args)))
        if spec.swap_space_gib is not None:
            runner.allocate_host_cache(host_cache_blocks(config, spec.block_size, spec.dtype, spec.swap_space_gib))
        while (plan := broadcast_plan(None)) is not None:
            runner.run_plan(plan)
    except Exception:  # rank 0 gone (the group broke) or this rank failed: rank 0 sees the exit
        logger.exception("tensor-parallel rank %d stops", rank)
        raise SystemExit(1) from None
    finally:
        destroy_tensor_parallel()
