"""Turns a scheduled step into tensors, runs the model, and samples.

The only module that builds tensors from scheduler output. Tokens are flattened with no padding: decode
requests (one new token) first, then prefill spans. It also owns the KV cache: one allocation, viewed
per layer, sized from a memory profile on GPU or a fixed budget on CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flotilla.engine.attention import AttentionMetadata, forward_context, select_backend
from flotilla.engine.cuda_graphs import Capture, DecodeGraphs, PiecewiseGraphs, cuda_capture
from flotilla.engine.lora.layers import lora_step
from flotilla.engine.lora.manager import LoRAManager
from flotilla.engine.lora.slots import SlotTable
from flotilla.engine.outputs import LogprobDict
from flotilla.engine.host_memory import cpu_kv_cache_bytes, memory_limit_bytes, rss_bytes
from flotilla.engine.parallel import broadcast_plan, kv_heads_per_rank, tp
from flotilla.engine.pooling import PoolerConfig, chunk_partial
from flotilla.engine.sampler import Sampler, top_logprobs
from flotilla.engine.scheduler import ScheduledRequest, SchedulerOutput
from flotilla.kernels import elementwise
from flotilla.kernels.lora import lora_batch

logger = logging.getLogger(__name__)


@dataclass
class StepPlan:
    """One step as plain, picklable data: all a tensor-parallel rank needs to run the same forward pass."""

    swap_out: list[tuple[int, int]]
    swap_in: list[tuple[int, int]]
    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    num_decodes: int
    decode_tables: list[list[int]]
    decode_lens: list[int]
    prefill_tables: list[list[int]]
    prefill_lens: list[int]
    query_start_loc: list[int]
    has_context: bool
    #: hidden-state row ranges whose logits feed prompt logprobs, in batch order
    logit_groups: list[tuple[int, int]]
    #: hidden-state rows that are sampled (one per request that completes its prompt), in batch order
    sample_rows: list[int]
    #: the pooling runner's prompt chunks: (first row, end row, whether the chunk starts its prompt), in batch order
    pool_spans: list[tuple[int, int, bool]] = field(default_factory=list)
    #: each token's adapter slot (-1: the base model); None when no token of the step uses an adapter
    lora_slots: list[int] | None = None
    #: adapters to copy into slots before the forward pass: (slot, adapter id, name, local folder)
    lora_loads: list[tuple[int, int, str, str]] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request id -> new token
    logprobs: dict[str, LogprobDict] = field(default_factory=dict)
    # request id -> prompt logprobs for the positions computed this step, in order
    prompt_logprobs: dict[str, list[LogprobDict]] = field(default_factory=dict)
    # request id -> why its own processing failed this step (the engine stops it; the batch goes on)
    failed: dict[str, str] = field(default_factory=dict)
    # request id -> what its prompt chunk adds to its pooled vector (pooling.chunk_partial)
    pooled: dict[str, torch.Tensor | None] = field(default_factory=dict)


def warm_up_plans(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                  block_size: int, pooling: bool = False) -> list[StepPlan]:
    """Synthetic steps of the shapes a server meets, run before it reports ready so that its first requests
    do not pay for first-use work (allocator growth, GEMM kernel selection, one-time code paths; graph capture
    on a GPU): fresh prefills from 16 tokens up to the step budget, decode batches from 1 up to
    ``max_num_seqs`` over a few hundred tokens of context, and decodes beside a prefill chunk over cached
    context. Every slot is -1 (nothing is written) and every table reads block 0, so no request's KV is touched.
    ``pooling``: the pooling runner's steps, which are prefills only, each pooled rather than sampled."""
    budget = min(max_num_batched_tokens, max_model_len)
    plans: list[StepPlan] = []

    def step(decodes: int, context: int, new: int, prefill_context: int) -> StepPlan:
        blocks = -(-context // block_size)
        prefill_blocks = -(-(prefill_context + new) // block_size)
        n = decodes + new
        return StepPlan(
            swap_out=[], swap_in=[], input_ids=[0] * n,
            positions=[context - 1] * decodes + list(range(prefill_context, prefill_context + new)),
            slots=[-1] * n, num_decodes=decodes,
            decode_tables=[[0] * blocks] * decodes, decode_lens=[context] * decodes,
            prefill_tables=[[0] * prefill_blocks] if new else [], prefill_lens=[prefill_context + new] if new else [],
            query_start_loc=[0, new] if new else [0], has_context=prefill_context > 0,
            logit_groups=[], sample_rows=[] if pooling else list(range(decodes)) + ([n - 1] if new else []),
            pool_spans=[(decodes, n, prefill_context == 0)] if pooling else [])

    for tokens in sorted({min(t, budget) for t in (16, 128, 512, 2048)}):
        plans.append(step(0, 1, tokens, 0))
    if pooling:
        return plans
    context = min(256, max_model_len)
    for batch in sorted({min(b, max_num_seqs, budget) for b in (1, 4, 16, 64, 256)}):
        plans.append(step(batch, context, 0, 0))
    decodes, chunk = min(4, max_num_seqs - 1), min(64, budget // 2, max_model_len // 2)
    if decodes > 0 and chunk > 0 and decodes + chunk <= budget:
        plans.append(step(decodes, context, chunk, chunk))
    return plans


def kv_head_shape(config: Any) -> tuple[int, int]:
    """(KV heads this tensor-parallel rank holds, head dim)."""
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return kv_heads_per_rank(num_kv_heads), head_dim


def kv_bytes_per_block(config: Any, block_size: int, dtype: torch.dtype) -> int:
    """One block's K and V over every layer, on this rank."""
    num_kv_heads, head_dim = kv_head_shape(config)
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * num_kv_heads * head_dim * elem


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: Any, device: torch.device, dtype: torch.dtype,
                 block_size: int, seed: int = 0, pooler: PoolerConfig | None = None) -> None:
        self.model = model
        self.pooler = pooler  # the pooling runner's: prompts are pooled, never sampled
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.backend = select_backend(device)
        self.sampler = Sampler(seed, device)
        self.kv_cache: torch.Tensor | None = None
        self.host_cache: torch.Tensor | None = None  # swap space, same layout, in host memory
        self.num_blocks = 0
        self.graphs: DecodeGraphs | None = None  # captured decode steps (CUDA), see capture_graphs
        self.piecewise: PiecewiseGraphs | None = None  # captured pieces of any step (CUDA), see capture_piecewise
        self.lora: LoRAManager | None = None  # adapter slots (enable_lora)
        self.lora_slots: SlotTable | None = None  # rank 0's: which adapter each slot holds

    def enable_lora(self, max_loras: int, max_rank: int, max_cpu_loras: int) -> LoRAManager:
        """Give the model's projections ``max_loras`` adapter slots of rank ``max_rank`` (before the KV cache is
        sized: the slots are weights too)."""
        self.lora = LoRAManager(self.model, self.config, max_loras, max_rank, max_cpu_loras, self.dtype, self.device)
        self.lora_slots = SlotTable(max_loras)
        return self.lora

    # ---- KV cache -----------------------------------------------------------------------------------

    def profile_num_blocks(self, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
        """GPU: run the largest step the scheduler can produce, then give the KV cache what is left of
        ``gpu_memory_utilization × total`` after weights and that peak."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._bind_cache(self._new_cache(1))
        n = max_num_batched_tokens
        meta = AttentionMetadata(
            slot_mapping=torch.full((n,), -1, dtype=torch.long, device=self.device),
            num_decode_tokens=0,
            decode_block_tables=torch.zeros(0, 1, dtype=torch.int32, device=self.device),
            decode_seq_lens=torch.zeros(0, dtype=torch.int32, device=self.device),
            prefill_block_tables=torch.zeros(1, 1, dtype=torch.int32, device=self.device),
            prefill_seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            prefill_query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            prefill_has_context=False,
        )
        with torch.inference_mode(), forward_context(meta):
            hidden = self.model(torch.zeros(n, dtype=torch.long, device=self.device),
                                torch.arange(n, device=self.device) % self.config.max_position_embeddings)
            if self.pooler is None:
                self.model.compute_logits(hidden[-min(n, 256):])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        free_for_kv = total * gpu_memory_utilization - peak
        per_block = kv_bytes_per_block(self.config, self.block_size, self.dtype)
        blocks = int(free_for_kv // per_block)
        logger.info("memory profile: total %.2f GiB, peak %.2f GiB, KV cache %.2f GiB = %d blocks",
                    total / 2**30, peak / 2**30, max(free_for_kv, 0) / 2**30, blocks)
        self.kv_cache = None
        return blocks

    def _new_cache(self, num_blocks: int) -> torch.Tensor:
        num_kv_heads, head_dim = kv_head_shape(self.config)
        return torch.zeros(self.config.num_hidden_layers, 2, num_blocks, num_kv_heads, self.block_size, head_dim,
                           dtype=self.dtype, device=self.device)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._bind_cache(self._new_cache(num_blocks))
        self.num_blocks = num_blocks

    def allocate_host_cache(self, num_blocks: int) -> None:
        num_kv_heads, head_dim = kv_head_shape(self.config)
        self.host_cache = torch.zeros(self.config.num_hidden_layers, 2, num_blocks, num_kv_heads, self.block_size,
                                      head_dim, dtype=self.dtype, device="cpu",
                                      pin_memory=self.device.type == "cuda")

    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Move whole blocks (every layer, K and V) between device and host, before the forward pass
        reuses any block freed by a swap-out."""
        assert self.kv_cache is not None
        if swap_out:
            src = torch.tensor([a for a, _ in swap_out], device=self.device)
            dst = torch.tensor([b for _, b in swap_out])
            self.host_cache[:, :, dst] = self.kv_cache[:, :, src].to("cpu")  # type: ignore[index]
        if swap_in:
            src = torch.tensor([a for a, _ in swap_in])
            dst = torch.tensor([b for _, b in swap_in], device=self.device)
            self.kv_cache[:, :, dst] = self.host_cache[:, :, src].to(self.device, non_blocking=True)  # type: ignore[index]

    def _bind_cache(self, cache: torch.Tensor) -> None:
        self.kv_cache = cache
        for i, attn in enumerate(self.model.attention_layers):
            attn.k_cache, attn.v_cache, attn.backend = cache[i, 0], cache[i, 1], self.backend

    def capture_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture the decode steps of every batch size up to ``max_num_seqs`` as CUDA graphs (cuda_graphs.py); run
        once the KV cache is allocated, since the graphs read it where it lies."""
        self.graphs = DecodeGraphs(self.model, self.device, max_num_seqs, -(-max_model_len // self.block_size))
        self.graphs.capture()

    def capture_piecewise(self, sizes: list[int], capture: Capture = cuda_capture) -> None:
        """Capture the pieces between the attention calls for steps of each of ``sizes`` tokens (cuda_graphs.py).
        Decode steps that a full graph holds still run it."""
        self.piecewise = PiecewiseGraphs(self.model, self.device, self.dtype, sizes, capture)
        self.piecewise.capture()

    # ---- one step -----------------------------------------------------------------------------------

    def plan(self, batch: list[ScheduledRequest], sched: SchedulerOutput, failed: set[str] = frozenset()) -> StepPlan:
        """The step as plain data (the only place that reads scheduler output): tokens, positions and cache
        slots, flattened decodes first, and the rows whose logits the step needs. ``failed``: requests computed
        without their adapter, whose output is thrown away."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_groups: list[tuple[int, int]] = []
        sample_rows: list[int] = []
        pool_spans: list[tuple[int, int, bool]] = []
        offset = 0
        for s in batch:
            r, start = s.request, s.request.num_computed_tokens
            end = start + s.num_new_tokens
            input_ids.extend(r.all_token_ids[start:end])
            positions.extend(range(start, end))
            table = r.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if r.sampling_params.prompt_logprobs is not None and start < r.num_prompt_tokens:
                # the prompt positions computed now that predict a following prompt token
                last = min(end, r.num_prompt_tokens - 1)
                if last > start:
                    logit_groups.append((offset, offset + last - start))
            if r.pooling is not None:
                pool_spans.append((offset, offset + s.num_new_tokens, start == 0))
            offset += s.num_new_tokens
            if s.completes_prompt and r.pooling is None:
                sample_rows.append(offset - 1)
        decodes = [s for s in batch if s.num_new_tokens == 1]
        prefills = batch[len(decodes):]

        def tables(group: list[ScheduledRequest]) -> tuple[list[list[int]], list[int]]:
            width = max((len(s.request.block_ids) for s in group), default=1)
            rows = [s.request.block_ids + [0] * (width - len(s.request.block_ids)) for s in group]
            return rows, [s.request.num_computed_tokens + s.num_new_tokens for s in group]

        d_tables, d_lens = tables(decodes)
        p_tables, p_lens = tables(prefills)
        qsl = [0]
        for s in prefills:
            qsl.append(qsl[-1] + s.num_new_tokens)
        lora_slots, lora_loads = self._plan_adapters(batch, failed)
        return StepPlan(list(sched.swap_out), list(sched.swap_in), input_ids, positions, slots, len(decodes),
                        d_tables, d_lens, p_tables, p_lens, qsl,
                        any(s.request.num_computed_tokens > 0 for s in prefills), logit_groups, sample_rows,
                        pool_spans, lora_slots, lora_loads)

    def _plan_adapters(self, batch: list[ScheduledRequest],
                       failed: set[str]) -> tuple[list[int] | None, list[tuple[int, int, str, str]]]:
        """Each token's adapter slot, and the slot loads that gives (None, [] when no request uses an adapter)."""
        table = self.lora_slots
        used = {s.request.lora_id: s.request for s in batch
                if s.request.lora_id and s.request.request_id not in failed}
        if table is None or not used:
            return None, []
        loads = [(slot, i, used[i].lora_request.lora_name, used[i].lora_folder)  # type: ignore[union-attr]
                 for slot, i in table.assign(list(used))]
        token_slots: list[int] = []
        for s in batch:
            adapter = s.request.lora_id if s.request.request_id not in failed else 0
            slot = table.slot_of(adapter) if adapter else -1
            token_slots.extend([slot] * s.num_new_tokens)  # type: ignore[list-item]
        return token_slots, loads

    def _metadata(self, plan: StepPlan) -> AttentionMetadata:
        """The step's attention metadata on the device. Built through numpy, which turns Python lists into arrays
        several times faster than ``torch.tensor`` (a block table of 256 rows: about 0.2 ms instead of 0.7)."""
        dev = self.device

        def tensor(values: list, dtype: Any = np.int32) -> torch.Tensor:
            return torch.from_numpy(np.array(values, dtype=dtype)).to(dev)

        def table(rows: list[list[int]]) -> torch.Tensor:
            return tensor(rows).reshape(len(rows), len(rows[0]) if rows else 1)

        return AttentionMetadata(
            slot_mapping=tensor(plan.slots, np.int64),
            num_decode_tokens=plan.num_decodes,
            decode_block_tables=table(plan.decode_tables),
            decode_seq_lens=tensor(plan.decode_lens),
            prefill_block_tables=table(plan.prefill_tables),
            prefill_seq_lens=tensor(plan.prefill_lens),
            prefill_query_start_loc=tensor(plan.query_start_loc),
            prefill_has_context=plan.has_context,
        )

    def _hidden(self, plan: StepPlan) -> torch.Tensor:
        """The step's hidden states: through the piecewise graphs when they hold it, else eagerly."""
        adapters = None if plan.lora_slots is None else lora_batch(plan.lora_slots, self.device)
        with (forward_context(self._metadata(plan)), lora_step(adapters),
              elementwise.compiled_cpu_kernels(self.backend.name == "cpu")):
            if self.piecewise is not None and adapters is None:  # the graphs hold the base model alone
                hidden = self.piecewise.run(plan.input_ids, plan.positions)
                if hidden is not None:
                    return hidden
            return self.model(torch.from_numpy(np.array(plan.input_ids, dtype=np.int64)).to(self.device),
                              torch.from_numpy(np.array(plan.positions, dtype=np.int64)).to(self.device))

    @torch.inference_mode()
    def run_plan(self, plan: StepPlan) -> tuple[list[torch.Tensor | Exception], torch.Tensor | None,
                                                list[torch.Tensor | None]]:
        """The forward pass every rank runs, with the same collectives in the same order: logits of each prompt
        logprobs group (an exception in its place when it failed, on one rank only), then of the sampled rows; and
        what each pooled prompt chunk contributes (no collective: the hidden states are whole on every rank)."""
        if plan.swap_out or plan.swap_in:
            self.swap(plan.swap_out, plan.swap_in)
        if plan.lora_loads:
            self.lora.activate(plan.lora_loads)  # type: ignore[union-attr]
        n = len(plan.input_ids)
        if (self.graphs is not None and plan.num_decodes == n and not plan.logit_groups
                and len(plan.sample_rows) == n and plan.lora_slots is None):  # graphs hold the base model alone
            logits = self.graphs.run(plan.input_ids, plan.positions, plan.slots, plan.decode_lens, plan.decode_tables)
            if logits is not None:
                return [], logits, []
        hidden = self._hidden(plan)
        groups: list[torch.Tensor | Exception] = []
        for start, end in plan.logit_groups:
            try:
                groups.append(self.model.compute_logits(hidden[start:end]))
            except Exception as e:  # e.g. a huge prompt_logprobs request out of memory: its own fault
                if tp().size > 1:
                    raise  # the other ranks are in the collective: no way to leave one request out
                groups.append(e)
        sampled = None
        if plan.sample_rows:
            sampled = self.model.compute_logits(hidden[torch.tensor(plan.sample_rows, device=self.device)])
        pooled = [] if self.pooler is None else [  # rank 0's: tensor-parallel workers only run the forward pass
            chunk_partial(hidden[a:b], self.pooler.pooling_type, starts) for a, b, starts in plan.pool_spans]
        return groups, sampled, pooled

    def warm_up(self, plans: list[StepPlan]) -> None:
        """Run synthetic steps (``warm_up_plans``) on every rank; their outputs are dropped."""
        for plan in plans:
            if tp().size > 1:
                broadcast_plan(plan)
            self.run_plan(plan)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        # Decodes first: the attention layer serves them with one batched call.
        batch = sorted(sched.scheduled, key=lambda s: s.num_new_tokens != 1)
        out = ModelRunnerOutput()
        if self.lora is not None:  # an adapter that can no longer be read fails its requests (run without it), not
            out.failed.update(self._unreadable_adapters(batch))  # the step
        plan = self.plan(batch, sched, set(out.failed))
        if tp().size > 1:
            broadcast_plan(plan)  # the other ranks run the same step on their shards
        groups, sampled, pooled = self.run_plan(plan)

        pools = iter(pooled)
        sample_reqs = []
        group = iter(groups)
        for s in batch:
            r = s.request
            if r.sampling_params.prompt_logprobs is not None and r.num_computed_tokens < r.num_prompt_tokens:
                start = r.num_computed_tokens
                count = min(start + s.num_new_tokens, r.num_prompt_tokens - 1) - start
                try:
                    logits = next(group) if count > 0 else None
                    if isinstance(logits, Exception):
                        raise logits
                    out.prompt_logprobs[r.request_id] = self._prompt_logprobs(logits, r, start, count)
                except Exception as e:  # its own fault: the engine stops this request, the batch goes on
                    logger.exception("request %s: prompt logprobs failed", r.request_id)
                    out.failed[r.request_id] = f"{type(e).__name__}: {e}"
            if r.pooling is not None:
                out.pooled[r.request_id] = next(pools)
            elif s.completes_prompt:
                sample_reqs.append(r)
        if sample_reqs:
            result = self.sampler(sampled, sample_reqs)
            for i, (r, token, lp) in enumerate(zip(sample_reqs, result.token_ids, result.logprobs)):
                if i in result.failed:
                    out.failed[r.request_id] = result.failed[i]
                    continue
                out.sampled[r.request_id] = token
                if lp is not None:
                    out.logprobs[r.request_id] = lp
        return out

    def _unreadable_adapters(self, batch: list[ScheduledRequest]) -> dict[str, str]:
        """Requests whose adapter has no slot yet and cannot be read into one (its folder gone since it was
        registered and its host copy evicted): request id -> why."""
        failed: dict[str, str] = {}
        for s in batch:
            r = s.request
            if r.lora_request is None or self.lora_slots.slot_of(r.lora_id) is not None:  # type: ignore[union-attr]
                continue
            try:
                self.lora.read(r.lora_id, r.lora_folder)  # type: ignore[union-attr,arg-type]
            except Exception as e:
                failed[r.request_id] = f"LoRA adapter {r.lora_request.lora_name!r}: {e}"
        return failed

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor | None, r: Any, start: int, count: int) -> list[LogprobDict]:
        """Log-probabilities of the prompt tokens that follow the positions computed this step."""
        if logits is None:
            return []
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        num = r.sampling_params.prompt_logprobs or 0
        return [top_logprobs(logprobs[j], r.prompt_token_ids[start + j + 1], num) for j in range(count)]


def kv_cache_blocks(runner: ModelRunner, gpu_memory_utilization: float, max_num_batched_tokens: int,
                    override: int | None = None, cpu_space_bytes: int | None = None, used: int | None = None,
                    max_blocks: int | None = None) -> int:
    """KV blocks this rank can hold: the override; on GPU what the memory profile leaves; on CPU this rank's share
    of the host budget (VLLM_CPU_KVCACHE_SPACE, else 4 GiB shrunk to the container's memory limit). ``used``: the
    process's footprint to leave room for on CPU (a measured peak), else its resident memory now. ``max_blocks``: the
    most a GPU cache is given (a tiny model on an 80 GB GPU would otherwise get millions of blocks, and the block
    pool's bookkeeping would take minutes to build)."""
    if override is not None:
        return override
    if runner.device.type == "cuda":
        blocks = runner.profile_num_blocks(gpu_memory_utilization, max_num_batched_tokens)
        if blocks < 1:
            raise ValueError("no GPU memory left for the KV cache: raise gpu_memory_utilization or use a "
                             "smaller model / max_num_batched_tokens")
        if max_blocks is not None and blocks > max_blocks:
            logger.info("KV cache: %d blocks fit, %d kept (four times every sequence at full length)", blocks,
                        max_blocks)
            blocks = max_blocks
        return blocks
    space = cpu_kv_cache_bytes(cpu_space_bytes, limit=memory_limit_bytes(), used=rss_bytes() if used is None else used,
                               utilization=gpu_memory_utilization)
    per_block = kv_bytes_per_block(runner.config, runner.block_size, runner.dtype)
    return max(space // tp().size // per_block, 1)


def host_cache_blocks(config: Any, block_size: int, dtype: torch.dtype, swap_space_gib: float) -> int:
    """Host (swap) blocks in ``swap_space_gib`` GiB, per rank."""
    return int(swap_space_gib * 2**30 // kv_bytes_per_block(config, block_size, dtype))
