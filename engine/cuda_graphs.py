"""CUDA graphs for decode steps: the whole forward pass and the LM head of a decode batch, captured once per batch
size and replayed, so a step costs one graph launch instead of hundreds of kernel launches from Python.

A pure-decode step of ``n`` sequences (no prompt tokens, no prompt logprobs) runs the graph of the smallest captured
size ``>= n`` (sizes 1, 2, 4, 8, then steps of 8 up to ``max_num_seqs``, as vLLM captures them). The step's inputs are
written into static buffers the graphs read: first into pinned host memory, then one ``non_blocking`` copy each. The
padded rows decode nothing: their cache slot is -1 (nothing is written) and their context length 0 (nothing is read,
output zero). Nothing in the captured region reads a device value back on the host, so replay is asynchronous; the
step's only sync is the sampler reading the sampled ids.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from flotilla.engine.attention import AttentionMetadata, forward_context

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every multiple of 8 up to ``max_num_seqs`` (itself included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8)) + [max_num_seqs]
    return sorted(set(sizes))


def padded_size(sizes: list[int], n: int) -> int | None:
    """The captured size a batch of ``n`` runs in (the smallest ``>= n``), or None when it is larger than all."""
    for s in sizes:
        if s >= n:
            return s
    return None


class DecodeGraphs:
    """The captured decode graphs of one model runner, with the static buffers they read and write."""

    def __init__(self, model: Any, device: torch.device, max_num_seqs: int, max_blocks_per_seq: int) -> None:
        self.model = model
        self.device = device
        self.sizes = capture_sizes(max_num_seqs)
        top, width = self.sizes[-1], max_blocks_per_seq
        self.width = width
        self.host = {  # pinned staging: filled from Python lists, then copied without blocking the host
            "input_ids": torch.zeros(top, dtype=torch.long, pin_memory=True),
            "positions": torch.zeros(top, dtype=torch.long, pin_memory=True),
            "slots": torch.full((top,), -1, dtype=torch.long, pin_memory=True),
            "seq_lens": torch.zeros(top, dtype=torch.int32, pin_memory=True),
            "tables": torch.zeros(top, width, dtype=torch.int32, pin_memory=True),
        }
        self.dev = {name: t.to(device) for name, t in self.host.items()}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _metadata(self, size: int) -> AttentionMetadata:
        d = self.dev
        empty = torch.zeros(0, dtype=torch.int32, device=self.device)
        return AttentionMetadata(
            slot_mapping=d["slots"][:size], num_decode_tokens=size,
            decode_block_tables=d["tables"][:size], decode_seq_lens=d["seq_lens"][:size],
            prefill_block_tables=empty.view(0, 1), prefill_seq_lens=empty,
            prefill_query_start_loc=torch.zeros(1, dtype=torch.int32, device=self.device), prefill_has_context=False)

    def _forward(self, size: int) -> torch.Tensor:
        with forward_context(self._metadata(size)):
            hidden = self.model(self.dev["input_ids"][:size], self.dev["positions"][:size])
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first (the later ones reuse its memory pool). Each is run once eagerly first,
        so Triton compiles its kernels (and cuBLAS picks its algorithms) outside the capture."""
        t = time.perf_counter()
        before = torch.cuda.memory_allocated(self.device)
        self.pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._forward(size)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._forward(size)
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize(self.device)
        logger.info("CUDA graphs: %d decode batch sizes (1..%d) captured in %.1fs, %.2f GiB", len(self.sizes),
                    self.sizes[-1], time.perf_counter() - t,
                    (torch.cuda.memory_allocated(self.device) - before) / 2**30)

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]]) -> torch.Tensor | None:
        """Logits ``[n, vocab]`` of a decode batch of ``n`` sequences, or None when no captured graph fits it (the
        caller runs it eagerly). The rows past ``n`` of the padded graph are left out."""
        n = len(input_ids)
        size = padded_size(self.sizes, n)
        if size is None or any(len(row) > self.width for row in tables):
            return None
        h = self.host
        h["input_ids"].numpy()[:n] = input_ids
        h["positions"].numpy()[:n] = positions
        slot_view, lens_view = h["slots"].numpy(), h["seq_lens"].numpy()
        slot_view[:n] = slots
        slot_view[n:size] = -1
        lens_view[:n] = seq_lens
        lens_view[n:size] = 0
        width = len(tables[0]) if tables else 0
        if width:  # entries past a row's own blocks are never read (its length bounds the kernel's loop)
            h["tables"].numpy()[:n, :width] = tables
        for name, rows in (("input_ids", n), ("positions", n), ("slots", size), ("seq_lens", size)):
            self.dev[name][:rows].copy_(h[name][:rows], non_blocking=True)
        self.dev["tables"][:n, :width].copy_(h["tables"][:n, :width], non_blocking=True)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]


def graphs_enabled(device: torch.device, enforce_eager: bool, tp_size: int) -> bool:
    """Graphs on a CUDA device unless ``enforce_eager`` (vLLM's switch); not yet with tensor parallelism, whose
    all-reduces inside a capture have not been run on a multi-GPU machine here."""
    return device.type == "cuda" and not enforce_eager and tp_size == 1

