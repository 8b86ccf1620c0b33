"""Turns a scheduled step into tensors, runs the model, and samples.

The only module that builds tensors from scheduler output. Tokens are flattened with no padding: decode
requests (one new token) first, then prefill spans. It also owns the KV cache: one allocation, viewed
per layer, sized from a memory profile on GPU or a fixed budget on CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from flotilla.engine.attention import AttentionMetadata, forward_context, select_backend
from flotilla.engine.outputs import LogprobDict
from flotilla.engine.parallel import kv_heads_per_rank
from flotilla.engine.sampler import Sampler, top_logprobs
from flotilla.engine.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request id -> new token
    logprobs: dict[str, LogprobDict] = field(default_factory=dict)
    # request id -> prompt logprobs for the positions computed this step, in order
    prompt_logprobs: dict[str, list[LogprobDict]] = field(default_factory=dict)
    # request id -> why its own processing failed this step (the engine stops it; the batch goes on)
    failed: dict[str, str] = field(default_factory=dict)


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
                 block_size: int, seed: int = 0) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.backend = select_backend(device)
        self.sampler = Sampler(seed, device)
        self.kv_cache: torch.Tensor | None = None
        self.host_cache: torch.Tensor | None = None  # swap space, same layout, in host memory
        self.num_blocks = 0

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

    # ---- one step -----------------------------------------------------------------------------------

    def _prepare(self, batch: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in batch:
            r, start = s.request, s.request.num_computed_tokens
            end = start + s.num_new_tokens
            input_ids.extend(r.all_token_ids[start:end])
            positions.extend(range(start, end))
            table = r.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        decodes = [s for s in batch if s.num_new_tokens == 1]
        prefills = batch[len(decodes):]

        def tables(group: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor]:
            width = max((len(s.request.block_ids) for s in group), default=1)
            rows = [s.request.block_ids + [0] * (width - len(s.request.block_ids)) for s in group]
            lens = [s.request.num_computed_tokens + s.num_new_tokens for s in group]
            return (torch.tensor(rows, dtype=torch.int32).reshape(len(group), width),
                    torch.tensor(lens, dtype=torch.int32))

        d_tables, d_lens = tables(decodes)
        p_tables, p_lens = tables(prefills)
        qsl = [0]
        for s in prefills:
            qsl.append(qsl[-1] + s.num_new_tokens)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev),
            num_decode_tokens=len(decodes),
            decode_block_tables=d_tables.to(dev),
            decode_seq_lens=d_lens.to(dev),
            prefill_block_tables=p_tables.to(dev),
            prefill_seq_lens=p_lens.to(dev),
            prefill_query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(dev),
            prefill_has_context=any(s.request.num_computed_tokens > 0 for s in prefills),
        )
        return torch.tensor(input_ids, dtype=torch.long).to(dev), torch.tensor(positions).to(dev), meta

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if sched.swap_out or sched.swap_in:
            self.swap(sched.swap_out, sched.swap_in)
        # Decodes first: the attention layer serves them with one batched call.
        batch = sorted(sched.scheduled, key=lambda s: s.num_new_tokens != 1)
        input_ids, positions, meta = self._prepare(batch)
        with forward_context(meta):
            hidden = self.model(input_ids, positions)

        out = ModelRunnerOutput()
        sample_rows: list[int] = []
        sample_reqs = []
        offset = 0
        for s in batch:
            r = s.request
            if r.sampling_params.prompt_logprobs is not None and r.num_computed_tokens < r.num_prompt_tokens:
                try:
                    out.prompt_logprobs[r.request_id] = self._prompt_logprobs(hidden, offset, s)
                except Exception as e:  # e.g. a huge prompt_logprobs request running out of memory: its own fault
                    logger.exception("request %s: prompt logprobs failed", r.request_id)
                    out.failed[r.request_id] = f"{type(e).__name__}: {e}"
            offset += s.num_new_tokens
            if s.completes_prompt:
                sample_rows.append(offset - 1)
                sample_reqs.append(r)
        if sample_reqs:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
            result = self.sampler(logits, sample_reqs)
            for i, (r, token, lp) in enumerate(zip(sample_reqs, result.token_ids, result.logprobs)):
                if i in result.failed:
                    out.failed[r.request_id] = result.failed[i]
                    continue
                out.sampled[r.request_id] = token
                if lp is not None:
                    out.logprobs[r.request_id] = lp
        return out

    def _prompt_logprobs(self, hidden: torch.Tensor, offset: int, s: ScheduledRequest) -> list[LogprobDict]:
        """Log-probabilities of the prompt tokens that follow the positions computed this step."""
        r = s.request
        start = r.num_computed_tokens
        end = min(start + s.num_new_tokens, r.num_prompt_tokens - 1)  # the last prompt position predicts output
        if end <= start:
            return []
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[offset:offset + end - start]).float(), dim=-1)
        num = r.sampling_params.prompt_logprobs or 0
        return [top_logprobs(logprobs[j], r.prompt_token_ids[start + j + 1], num) for j in range(end - start)]
