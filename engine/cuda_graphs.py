"""CUDA graphs: a step's kernels captured once per size and replayed, so a step costs a few graph launches instead of
hundreds of kernel launches from Python. Two kinds, picked by ``CompilationConfig.cudagraph_mode`` (vLLM's names):

**Full graphs of decode steps** (``DecodeGraphs``). A pure-decode step of ``n`` sequences (no prompt tokens, no prompt
logprobs) runs the graph of the smallest captured size ``>= n`` (sizes 1, 2, 4, 8, then steps of 8 up to
``max_num_seqs``, as vLLM captures them): the whole forward pass and the LM head. The step's inputs are written into
static buffers the graphs read: first into pinned host memory, then one ``non_blocking`` copy each. The padded rows
decode nothing: their cache slot is -1 (nothing is written) and their context length 0 (nothing is read, output
zero). Nothing in the captured region reads a device value back on the host, so replay is asynchronous; the step's
only sync is the sampler reading the sampled ids.

**Piecewise graphs of any step** (``PiecewiseGraphs``). A step that mixes prompt tokens with decodes cannot be one
graph: the prefill attention's launch depends on the step's prompts. Everything else in a layer depends only on the
number of tokens, so each size captures ``L + 1`` graphs, the pieces between a model's ``L`` attention calls
(embedding to layer 0's q/k/v; layer ``i``'s output projection, MLP and layer ``i+1``'s q/k/v; the last layer's to
the final norm), and the attention runs eagerly between them on the step's own metadata. A step of ``n`` tokens
runs in the smallest captured size ``>= n``; its padded rows compute on stale inputs that no attention reads and no
logit takes. Whatever crosses a boundary lives in static buffers outside the graphs' memory pool (q, k, v, the
attention output, the residual stream, the final hidden states), so the pieces of every size can share one pool.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol

import torch

from flotilla.engine.attention import AttentionMetadata, forward_context
from flotilla.engine.config import CompilationConfig

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


def mixed_capture_sizes(max_tokens: int) -> list[int]:
    """Step sizes (tokens) the piecewise graphs are captured for: every multiple of 16 up to 256, then of 32 up to
    ``max_tokens`` (itself included): a step is padded by at most 15 tokens, or 31 past 256."""
    sizes = [s for s in range(16, min(max_tokens, 256) + 1, 16)] + list(range(288, max_tokens + 1, 32))
    return sorted(set(sizes + [max_tokens]))


class Replayable(Protocol):
    def replay(self) -> None: ...


#: captures ``fn`` (which reads and writes static buffers only) into a graph in ``pool``; returns what replays it
Capture = Callable[[Callable[[], None], Any], Replayable]


def cuda_capture(fn: Callable[[], None], pool: Any) -> Replayable:
    """A CUDA graph of ``fn``, run once eagerly first so that Triton compiles its kernels (and cuBLAS picks its
    algorithms) outside the capture."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


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
        """Capture every size, largest first (the later ones reuse its memory pool)."""
        t = time.perf_counter()
        before = torch.cuda.memory_allocated(self.device)
        self.pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            out: list[torch.Tensor] = []
            graph = cuda_capture(lambda: out.append(self._forward(size)), self.pool)
            self.graphs[size] = (graph, out[-1])  # the captured run's logits: what replay writes
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


class PiecewiseGraphs:
    """A model's forward pass as captured pieces around its attention calls, per step size (see the module's text).
    The model provides ``embed``, ``layers`` (each with ``before_attention``, ``after_attention`` and
    ``self_attn.attn``) and ``final_norm``, as ``models/llama.py`` does. ``capture``: how a piece becomes replayable
    (``cuda_capture``; the CPU suite passes one that replays by running the piece again, to check the pieces and
    their buffers against the plain forward pass)."""

    def __init__(self, model: Any, device: torch.device, dtype: torch.dtype, sizes: list[int],
                 capture: Capture = cuda_capture) -> None:
        self.model, self.device, self.sizes, self._capture = model, device, sizes, capture
        attn = model.layers[0].self_attn
        top, hidden = sizes[-1], model.config.hidden_size
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim

        def buffer(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.input_ids, self.positions = buffer(top, dtype=torch.long), buffer(top, dtype=torch.long)
        pinned = device.type == "cuda"  # staging for non_blocking copies; on the CPU the buffers are written directly
        self.host_ids = torch.zeros(top, dtype=torch.long, pin_memory=pinned) if pinned else self.input_ids
        self.host_positions = torch.zeros(top, dtype=torch.long, pin_memory=pinned) if pinned else self.positions
        # Recorded after a step's copies out of the pinned buffers. A step that samples nothing (a prompt chunk
        # alone) never waits for the GPU, so the next one could rewrite the buffers before the copies read them.
        self.inputs_copied = torch.cuda.Event() if pinned else None
        self.q, self.k, self.v = buffer(top, heads, head_dim), buffer(top, kv_heads, head_dim), buffer(
            top, kv_heads, head_dim)
        self.attn_out, self.residual, self.hidden = buffer(top, heads * head_dim), buffer(top, hidden), buffer(
            top, hidden)
        self.graphs: dict[int, list[Replayable]] = {}

    def pieces(self, size: int) -> list[Callable[[], None]]:
        """The ``L + 1`` pieces of a ``size``-token step, each reading and writing the static buffers only."""
        m, layers = self.model, self.model.layers
        ids, positions, attn, res = self.input_ids[:size], self.positions[:size], self.attn_out[:size], self.residual[
            :size]

        def into_buffers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor) -> None:
            for buf, t in ((self.q, q), (self.k, k), (self.v, v), (self.residual, residual)):
                buf[:size].copy_(t)

        def first() -> None:
            into_buffers(*layers[0].before_attention(positions, m.embed(ids), None))

        def between(i: int) -> Callable[[], None]:
            def piece() -> None:  # layer i-1 after its attention, layer i up to its attention
                into_buffers(*layers[i].before_attention(positions, *layers[i - 1].after_attention(attn, res)))
            return piece

        def last() -> None:
            self.hidden[:size].copy_(m.final_norm(*layers[-1].after_attention(attn, res)))

        return [first, *(between(i) for i in range(1, len(layers))), last]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, into one memory pool (nothing a piece allocates outlives it)."""
        t = time.perf_counter()
        cuda = self.device.type == "cuda"
        before = torch.cuda.memory_allocated(self.device) if cuda else 0
        pool = torch.cuda.graph_pool_handle() if cuda else None
        for size in reversed(self.sizes):
            self.graphs[size] = [self._capture(piece, pool) for piece in self.pieces(size)]
        if cuda:
            torch.cuda.synchronize(self.device)
        logger.info("CUDA graphs: %d pieces at %d step sizes (%d..%d tokens) captured in %.1fs, %.2f GiB",
                    len(self.model.layers) + 1, len(self.sizes), self.sizes[0], self.sizes[-1],
                    time.perf_counter() - t, ((torch.cuda.memory_allocated(self.device) if cuda else 0) - before) / 2**30)

    def run(self, input_ids: list[int], positions: list[int]) -> torch.Tensor | None:
        """Hidden states ``[n, hidden]`` of a step of ``n`` tokens, or None when it is larger than every captured
        size (the caller runs it eagerly). Runs inside the step's ``forward_context``: the attention between the
        pieces reads its metadata. The result is a view of a buffer the next step overwrites."""
        n = len(input_ids)
        size = padded_size(self.sizes, n)
        if size is None:
            return None
        if self.inputs_copied is not None:
            self.inputs_copied.synchronize()  # the last step's copies are done with the pinned buffers
        self.host_ids.numpy()[:n] = input_ids
        self.host_positions.numpy()[:n] = positions
        if self.inputs_copied is not None:
            self.input_ids[:n].copy_(self.host_ids[:n], non_blocking=True)
            self.positions[:n].copy_(self.host_positions[:n], non_blocking=True)
            self.inputs_copied.record()
        graphs = self.graphs[size]
        for layer, graph in zip(self.model.layers, graphs):
            graph.replay()
            self.attn_out[:n].copy_(layer.self_attn.attn(self.q[:n], self.k[:n], self.v[:n]))
        graphs[-1].replay()
        return self.hidden[:n]


#: the largest step a piecewise graph is captured for unless max_cudagraph_capture_size says otherwise (tokens)
PIECEWISE_MAX_TOKENS = 1024


def graph_sizes(compilation: CompilationConfig, max_num_seqs: int,
                max_num_batched_tokens: int) -> tuple[int | None, list[int] | None]:
    """(the largest decode batch a full graph is captured for, the step sizes piecewise graphs are captured for);
    None where that kind is off."""
    cap = compilation.max_cudagraph_capture_size
    decode = min(max_num_seqs, cap or max_num_seqs) if compilation.decode_graphs else None
    mixed = mixed_capture_sizes(min(cap or PIECEWISE_MAX_TOKENS, max_num_batched_tokens))
    return decode, mixed if compilation.piecewise_graphs else None


def graphs_enabled(device: torch.device, enforce_eager: bool, tp_size: int) -> bool:
    """Graphs on a CUDA device unless ``enforce_eager`` (vLLM's switch); not yet with tensor parallelism, whose
    all-reduces inside a capture have not been run on a multi-GPU machine here."""
    return device.type == "cuda" and not enforce_eager and tp_size == 1

