"""Iteration-level scheduling: which requests run this step and how many tokens each computes.

Every step has a token budget (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``).
Running requests go first (decodes take one token, unfinished prompt chunks what the budget allows),
then swapped-out requests come back, then waiting requests are admitted FCFS. When the pool runs out
of blocks the newest running request is preempted: by recompute (its blocks are freed and it waits again
at the head of the queue, keeping the tokens it generated) or, in swap mode while host blocks last, by
swapping its K/V out to host memory and back in later. The scheduler returns plain data, including the
block copies to make; only the model runner builds tensors and moves bytes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from flotilla.engine.block_manager import BlockManager, SwapPool
from flotilla.engine.config import SchedulerConfig
from flotilla.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, starting at request.num_computed_tokens

    @property
    def completes_prompt(self) -> bool:
        """True when this step reaches the end of the request's known tokens, so it samples a token."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Block copies the runner makes before the forward pass, as (source, destination) pairs.
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # device block -> host block
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # host block -> device block

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, swap_pool: SwapPool | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.swap_pool = swap_pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.num_preemptions = 0
        self.num_swap_outs = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not bm.allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim, out)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
                i += 1

        # The adapters of the running requests: each needs a device slot, and there are max_loras of them.
        adapters = {r.lora_id for r in self.running if r.lora_id}

        # Swapped-out requests return before new ones are admitted, oldest first.
        while self.swapped and not out.preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.swapped[0]
            if not self._adapter_fits(request, adapters):
                break
            host_blocks = request.cpu_block_ids
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not bm.allocate(request, num_new):
                break
            self.swapped.popleft()
            out.swap_in.extend(zip(host_blocks, request.block_ids))
            self.swap_pool.free(host_blocks)  # type: ignore[union-attr]
            request.cpu_block_ids = []
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if request.lora_id:
                adapters.add(request.lora_id)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

        # Admitting new work while evicting running work would only thrash. A request whose grammar is still
        # compiling, or whose adapter has no slot while max_loras others run, keeps its place at the head of the queue
        # while those behind it are admitted.
        held_back: list[Request] = []
        while self.waiting and not self.swapped and not out.preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if not request.schedulable or not self._adapter_fits(request, adapters):
                held_back.append(self.waiting.popleft())
                continue
            prefix = bm.match_prefix(request)
            remaining = request.num_tokens - len(prefix) * bm.block_size
            if not self.config.enable_chunked_prefill and remaining > budget:
                break
            num_new = min(remaining, budget)
            if not bm.allocate(request, num_new, prefix):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if request.lora_id:
                adapters.add(request.lora_id)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(held_back))
        return out

    def _adapter_fits(self, request: Request, adapters: set[int]) -> bool:
        """Whether running ``request`` keeps the running requests' distinct ``adapters`` within ``max_loras``."""
        return not request.lora_id or request.lora_id in adapters or len(adapters) < self.config.max_loras

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        # Move the blocks holding computed K/V; a request with nothing computed has nothing worth keeping.
        computed_blocks = self.block_manager.blocks_needed(request.num_computed_tokens)
        host = None
        if self.config.preemption_mode == "swap" and self.swap_pool is not None and computed_blocks:
            host = self.swap_pool.allocate(computed_blocks)
        if host is not None:
            out.swap_out.extend(zip(request.block_ids[:computed_blocks], host))
            request.cpu_block_ids = host
            self.block_manager.free(request)
            request.status = RequestStatus.SWAPPED
            self.num_swap_outs += 1
            self.swapped.append(request)
            return
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues for good and return its blocks."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status == RequestStatus.SWAPPED:
            self.swapped.remove(request)
            self.swap_pool.free(request.cpu_block_ids)  # type: ignore[union-attr]
            request.cpu_block_ids = []
        request.status = status
        self.block_manager.free(request)
