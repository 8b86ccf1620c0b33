"""CUDA graphs for decode steps (engine/cuda_graphs.py): which batch sizes are captured and which graph a batch runs
in (anywhere), and on a GPU, that decoding through the graphs gives the eager engine's tokens exactly, for every tiny
family (the mixtures of experts run the fused MoE kernel inside the graphs)."""

from __future__ import annotations

import pytest
import torch

from flotilla.engine.cuda_graphs import capture_sizes, graphs_enabled, padded_size


def test_capture_sizes_are_powers_of_two_to_eight_then_steps_of_eight_up_to_max_num_seqs():
    assert capture_sizes(256) == [1, 2, 4] + list(range(8, 257, 8))
    assert capture_sizes(12) == [1, 2, 4, 8, 12]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]


def test_a_batch_runs_in_the_smallest_captured_size_that_holds_it():
    sizes = capture_sizes(20)  # [1, 2, 4, 8, 16, 20]
    assert [padded_size(sizes, n) for n in (1, 2, 3, 5, 8, 9, 17, 20)] == [1, 2, 4, 8, 8, 16, 20, 20]
    assert padded_size(sizes, 21) is None  # larger than every graph: the step runs eagerly


def test_graphs_only_on_cuda_and_only_when_not_enforce_eager():
    assert not graphs_enabled(torch.device("cpu"), False, 1)
    assert graphs_enabled(torch.device("cuda"), False, 1)
    assert not graphs_enabled(torch.device("cuda"), True, 1)
    assert not graphs_enabled(torch.device("cuda"), False, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_decoding_through_graphs_gives_the_eager_engines_tokens(tiny_model):
    from flotilla.engine import LLM, SamplingParams

    # 12 sequences at most: as requests finish the batch shrinks through sizes that are padded (11 -> 12, 7 -> 8, 3 -> 4)
    prompts = [{"prompt_token_ids": [(31 * i + 7 * j) % 1000 + 3 for j in range(5 + 3 * i)]} for i in range(20)]
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(20)]
    results = {}
    for eager in (True, False):
        llm = LLM(str(tiny_model), dtype="float32", max_num_seqs=12, enforce_eager=eager)
        graphs = llm.llm_engine.runner.graphs
        assert (graphs is None) == eager
        replays = []
        if graphs is not None:
            run = graphs.run
            graphs.run = lambda *a: replays.append(len(a[0])) or run(*a)
        results[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if not eager:
            assert replays and set(replays) - set(capture_sizes(12)), "padded sizes must have been replayed"
        del llm
    assert results[False] == results[True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("mode", ["FULL_AND_PIECEWISE", "PIECEWISE"])
def test_steps_with_prompts_through_piecewise_graphs_give_the_eager_engines_tokens(tiny_model, mode):
    from flotilla.engine import LLM, SamplingParams

    # 20 prompts of 5 to 62 tokens, 8 sequences at most, a budget of 96 tokens a step: steps mix decodes with prompt
    # chunks, and are padded to the captured sizes (16, 32, ..., 96)
    prompts = [{"prompt_token_ids": [(31 * i + 7 * j) % 1000 + 3 for j in range(5 + 3 * i)]} for i in range(20)]
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(20)]
    results, ran = {}, []
    for eager in (True, False):
        llm = LLM(str(tiny_model), dtype="float32", max_num_seqs=8, max_num_batched_tokens=96, enforce_eager=eager,
                  compilation_config={"cudagraph_mode": mode})
        runner = llm.llm_engine.runner
        assert (runner.piecewise is None) == eager
        assert (runner.graphs is not None) == (not eager and mode == "FULL_AND_PIECEWISE")
        if not eager:
            run = runner.piecewise.run
            runner.piecewise.run = lambda ids, pos: ran.append(len(ids)) or run(ids, pos)
        results[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
    assert any(n > 8 for n in ran) and any(n % 16 for n in ran), "padded steps with prompts must have replayed"
    assert results[False] == results[True]
