"""Piecewise CUDA graphs (engine/cuda_graphs.py ``PiecewiseGraphs``): the forward pass cut at its attention calls,
the pieces captured per step size, the attention run eagerly between them.

What can be checked anywhere is checked here on the CPU, with pieces that "replay" by running again: that the model's
pieces and the static buffers between them compute what the plain forward pass computes, for every tiny family, for
steps that mix prompt chunks with decodes, pad to a captured size, or are larger than every size (eager). On a GPU
the same workloads run through real CUDA graphs (test_cuda_graphs.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernel_cases  # noqa: F401  (first: without CUDA it sets TRITON_INTERPRET, which the Triton kernels read)
from conftest import assert_pool_whole, hf_greedy
from flotilla.engine import LLM, SamplingParams
from flotilla.engine.config import CompilationConfig, EngineArgs
from flotilla.engine.cuda_graphs import PIECEWISE_MAX_TOKENS, graph_sizes, mixed_capture_sizes
from flotilla.kernels.elementwise import ELEMENTWISE_ENV
from flotilla.kernels.moe import MOE_ENV


class _Rerun:
    """A piece that replays by running again: what a CUDA graph of it does, given that it reads and writes the
    static buffers only."""

    def __init__(self, fn) -> None:
        self.fn, self.replays = fn, 0

    def replay(self) -> None:
        self.replays += 1
        self.fn()


def _rerun_capture(fn, pool):
    fn()  # as cuda_capture runs it once before capturing
    return _Rerun(fn)


def test_mixed_step_sizes_are_multiples_of_16_to_256_then_of_32():
    assert mixed_capture_sizes(1024) == list(range(16, 257, 16)) + list(range(288, 1025, 32))
    assert mixed_capture_sizes(100) == [16, 32, 48, 64, 80, 96, 100]
    assert mixed_capture_sizes(300) == list(range(16, 257, 16)) + [288, 300]
    assert mixed_capture_sizes(8) == [8]


def test_which_graphs_each_cudagraph_mode_captures():
    def sizes(mode, cap=None, seqs=256, batched=2048):
        return graph_sizes(CompilationConfig(mode, cap), seqs, batched)

    assert sizes("FULL_DECODE_ONLY") == (256, None)
    assert sizes("FULL_AND_PIECEWISE") == (256, mixed_capture_sizes(PIECEWISE_MAX_TOKENS))
    assert sizes("PIECEWISE") == (None, mixed_capture_sizes(PIECEWISE_MAX_TOKENS))
    assert sizes("NONE") == (None, None)
    # max_cudagraph_capture_size caps both kinds; the step budget caps the pieces
    assert sizes("FULL_AND_PIECEWISE", cap=128) == (128, mixed_capture_sizes(128))
    assert sizes("FULL_AND_PIECEWISE", batched=512) == (256, mixed_capture_sizes(512))
    assert sizes("FULL_AND_PIECEWISE", seqs=8, batched=64) == (8, mixed_capture_sizes(64))


def test_compilation_config_parses_vllms_json_and_refuses_what_it_cannot_do():
    assert CompilationConfig.parse(None) == CompilationConfig("FULL_DECODE_ONLY", None)
    assert CompilationConfig.parse('{"cudagraph_mode": "full_and_piecewise"}').cudagraph_mode == "FULL_AND_PIECEWISE"
    assert CompilationConfig.parse({"cudagraph_mode": "PIECEWISE", "max_cudagraph_capture_size": 512}) == \
        CompilationConfig("PIECEWISE", 512)
    for bad, reason in (("{", "not JSON"), ("3", "JSON object"), ('{"level": 3}', "unknown field.*level.*torch.compile"),
                        ('{"cudagraph_mode": "FULL"}', "use FULL_AND_PIECEWISE"),
                        ('{"cudagraph_mode": "SOME"}', "must be one of"),
                        ('{"max_cudagraph_capture_size": 0}', ">= 1"),
                        ('{"max_cudagraph_capture_size": "512"}', ">= 1")):
        with pytest.raises(ValueError, match=reason):
            CompilationConfig.parse(bad)
    with pytest.raises(ValueError, match="cudagraph_mode"):
        EngineArgs(model="m", compilation_config={"cudagraph_mode": "FULL"}).validate()


def test_the_cli_takes_compilation_config_and_its_short_flag():
    from flotilla.engine.cli import build_parser, engine_args_from_cli

    for flag in ("--compilation-config", "-O"):
        ns = build_parser().parse_args(["serve", "m", flag, json.dumps({"cudagraph_mode": "PIECEWISE"})])
        args = engine_args_from_cli(ns)
        assert CompilationConfig.parse(args.compilation_config).cudagraph_mode == "PIECEWISE"


def _workload(vocab: int, seed: int) -> tuple[list[dict], list[SamplingParams]]:
    """Prompts of 1 to 90 tokens, some sharing a 48-token prefix (cache hits), outputs of 4 to 20 tokens: steps mix
    decodes with prompt chunks of every size, some over the largest captured size."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(48)]
    prompts = []
    for i in range(14):
        own = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 42 if i % 3 == 0 else 90))]
        prompts.append({"prompt_token_ids": shared + own if i % 3 == 0 else own})
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 20), ignore_eos=True) for _ in prompts]
    return prompts, params


def _piecewise_llm(folder, sizes, **kwargs) -> tuple[LLM, list[int], list[int]]:
    """An engine whose steps go through pieces captured for ``sizes``, with the sizes of the steps that ran in them
    and of those that were too large (eager) recorded."""
    llm = LLM(str(folder), dtype="float32", max_num_seqs=6, max_num_batched_tokens=64, **kwargs)
    runner = llm.llm_engine.runner
    runner.capture_piecewise(sizes, capture=_rerun_capture)
    ran: list[int] = []
    eager: list[int] = []
    run = runner.piecewise.run

    def recorded(input_ids, positions):
        hidden = run(input_ids, positions)
        (eager if hidden is None else ran).append(len(input_ids))
        return hidden

    runner.piecewise.run = recorded
    return llm, ran, eager


def test_steps_through_the_pieces_give_the_plain_forward_passs_tokens(tiny_model):
    prompts, params = _workload(1000, seed=0)
    plain = LLM(str(tiny_model), dtype="float32", max_num_seqs=6, max_num_batched_tokens=64)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    del plain
    llm, ran, eager = _piecewise_llm(tiny_model, [16, 32, 48])
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert any(n not in (16, 32, 48) for n in ran), "some steps must have been padded to a captured size"
    assert any(n > 6 for n in ran), "steps with prompt tokens must have run in the pieces"
    assert eager and min(eager) > 48, "steps over the largest size run eagerly"
    assert_pool_whole(llm.llm_engine)


def test_the_pieces_match_transformers_through_chunking_and_prefix_hits(tiny_llama):
    prompts, params = _workload(1000, seed=1)
    llm, ran, _ = _piecewise_llm(tiny_llama, [16, 32, 48, 64])
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.block_manager.prefix_hits > 0
    assert ran and max(ran) > 48
    for prompt, param, out in zip(prompts, params, outs):
        assert out.outputs[0].token_ids == hf_greedy(tiny_llama, prompt["prompt_token_ids"], param.max_tokens)


class _HostReads(TorchDispatchMode):
    """Records the ops that read a device value back on the host (a sync, which a CUDA graph capture refuses), copy
    host data in (``torch.tensor`` of a list: a pageable copy, refused too), or size their output by the data
    (boolean-mask indexing, ``nonzero``), so replay could not repeat them."""

    SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "masked_select", "lift_fresh",
             "lift_fresh_copy", "_unique2", "unique_dim", "unique_consecutive", "bincount", "histc"}

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.SYNCS:
            self.found.add(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.found.add(f"{name} with a boolean mask")
        elif name == "repeat_interleave" and isinstance(args[0 if len(args) == 1 else 1], torch.Tensor) \
                and kwargs.get("output_size") is None:
            self.found.add("repeat_interleave without output_size")
        return func(*args, **kwargs)


def _host_reads_of(fn) -> set[str]:
    with _HostReads() as log:
        fn()
    return log.found


def test_the_host_read_check_finds_what_breaks_a_capture():
    x = torch.randn(8)
    assert _host_reads_of(lambda: x.sum().item()) == {"_local_scalar_dense"}
    assert _host_reads_of(lambda: x[x > 0]) == {"index with a boolean mask"}
    assert _host_reads_of(lambda: x + torch.tensor([1.0])) == {"lift_fresh"}
    assert _host_reads_of(lambda: torch.repeat_interleave(x, torch.tensor([2] * 8), dim=0)) >= {
        "repeat_interleave without output_size"}
    assert _host_reads_of(lambda: (x * 2).softmax(0)) == set()


def test_no_piece_reads_the_device_on_the_host(tiny_model, monkeypatch):
    """What makes a CUDA graph capture fail, checked before a GPU sees it: every piece of every family, through the
    kernels a GPU runs (Triton, interpreted here), neither syncs nor sizes anything by the data."""
    found: dict[int, set[str]] = {}

    def checked_capture(fn, pool):
        found[len(found)] = _host_reads_of(fn)
        return _Rerun(fn)

    llm = LLM(str(tiny_model), dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, warmup=False)
    monkeypatch.setenv(ELEMENTWISE_ENV, "triton")  # read at each call: the pieces run what a GPU would
    monkeypatch.setenv(MOE_ENV, "triton")
    llm.llm_engine.runner.capture_piecewise([16, 32], capture=checked_capture)
    assert len(found) == 2 * (len(llm.llm_engine.runner.model.layers) + 1)
    assert {piece: ops for piece, ops in found.items() if ops} == {}
