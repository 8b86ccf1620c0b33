"""Greedy outputs are token-for-token those of transformers' generate() (fp32, CPU), however the engine
batches, chunks, caches or preempts."""

from __future__ import annotations

import random

import pytest

from conftest import assert_pool_whole, hf_greedy
from flotilla.engine import LLM, LLMEngine, EngineArgs, SamplingParams


def _prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)


def _check(llm_or_engine, folder, prompts, outputs, n) -> None:
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == hf_greedy(folder, prompt, n), f"prompt of {len(prompt)} tokens differs"


def test_batch_of_mixed_lengths_matches_transformers(tiny_model):
    llm = LLM(str(tiny_model), dtype="float32", max_num_seqs=8)
    prompts = _prompts(6, 1, 70, llm.llm_engine.model_config.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(12), use_tqdm=False)
    _check(llm, tiny_model, prompts, outs, 12)
    assert_pool_whole(llm.llm_engine)


def test_requests_joining_mid_flight_match_transformers(tiny_llama):
    engine = LLMEngine(EngineArgs(model=str(tiny_llama), dtype="float32"))
    prompts = _prompts(5, 3, 40, engine.model_config.vocab_size, seed=1)
    done = {}
    engine.add_request("a0", prompts[0], _greedy(16))
    engine.add_request("a1", prompts[1], _greedy(16))
    steps = 0
    while engine.has_unfinished_requests() or steps < 8:
        if steps in (2, 5, 7):  # join while others are decoding
            i = {2: 2, 5: 3, 7: 4}[steps]
            engine.add_request(f"a{i}", prompts[i], _greedy(16))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
    for i, prompt in enumerate(prompts):
        assert done[f"a{i}"].outputs[0].token_ids == hf_greedy(tiny_llama, prompt, 16)
    assert_pool_whole(engine)


def test_forced_preemption_from_a_tiny_pool_keeps_outputs_exact(tiny_llama):
    # 10 blocks x 16 tokens cannot hold six requests of ~50 tokens each: the newest get preempted.
    llm = LLM(str(tiny_llama), dtype="float32", num_gpu_blocks_override=10, max_model_len=160,
              enable_prefix_caching=False)
    engine = llm.llm_engine
    prompts = _prompts(6, 20, 40, engine.model_config.vocab_size, seed=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(24), use_tqdm=False)
    assert engine.scheduler.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) == engine.scheduler.num_preemptions
    _check(llm, tiny_llama, prompts, outs, 24)
    assert_pool_whole(engine)


def test_chunked_prefill_with_a_small_budget_is_exact(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", max_num_batched_tokens=16, enable_prefix_caching=False)
    prompts = _prompts(4, 30, 90, llm.llm_engine.model_config.vocab_size, seed=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(10), use_tqdm=False)
    _check(llm, tiny_llama, prompts, outs, 10)
    assert_pool_whole(llm.llm_engine)


def test_prefix_cache_hits_are_exact_and_skip_computation(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", enable_prefix_caching=True)
    engine = llm.llm_engine
    vocab = engine.model_config.vocab_size
    shared = _prompts(1, 64, 64, vocab, seed=4)[0]
    first = shared + [5, 6, 7]
    second = shared + [9, 10, 11, 12]
    (out1,) = llm.generate([{"prompt_token_ids": first}], _greedy(8), use_tqdm=False)
    (out2,) = llm.generate([{"prompt_token_ids": second}], _greedy(8), use_tqdm=False)
    assert out1.num_cached_tokens == 0
    assert out2.num_cached_tokens == 64  # four full blocks of the shared prefix were reused
    assert engine.block_manager.prefix_hits == 64
    _check(llm, tiny_llama, [first, second], [out1, out2], 8)
    assert_pool_whole(engine)


def test_prefix_cache_on_and_off_agree_under_preemption_and_chunking(tiny_model):
    vocab_probe = LLM(str(tiny_model), dtype="float32", num_gpu_blocks_override=64)
    vocab = vocab_probe.llm_engine.model_config.vocab_size
    base = _prompts(1, 40, 40, vocab, seed=5)[0]
    prompts = [base + p for p in _prompts(6, 1, 30, vocab, seed=6)]
    results = []
    for caching in (True, False):
        llm = LLM(str(tiny_model), dtype="float32", num_gpu_blocks_override=14, max_model_len=128,
                  max_num_batched_tokens=32, enable_prefix_caching=caching)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(20), use_tqdm=False)
        results.append([o.outputs[0].token_ids for o in outs])
        assert_pool_whole(llm.llm_engine)
    assert results[0] == results[1]
    assert results[0][0] == hf_greedy(tiny_model, prompts[0], 20)


@pytest.mark.smollm2
def test_smollm2_greedy_chat_matches_transformers(smollm2_dir, tokenizer):
    llm = LLM(dtype="float32", max_model_len=512)  # model=None: the bundled SmolLM2 GGUF
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write a haiku about paged attention."}],
        [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Colour of the sky?"}],
    ]
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
               for c in chats]
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    for p, o in zip(prompts, outs):
        # No EOS masking here: both stop at <|im_end|> (the engine keeps it, as generate() does).
        expected = hf_greedy(smollm2_dir, list(p), 40, min_new_tokens=0)
        if expected and expected[-1] == tokenizer.eos_token_id:
            assert o.outputs[0].finish_reason == "stop"
        assert o.outputs[0].token_ids == expected
        assert o.outputs[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    # Special tokens kept (as a tool parser needs them): the stop token is still not text, as in vLLM, unless
    # include_stop_str_in_output asks for it.
    for include in (False, True):
        kept = llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=40, skip_special_tokens=False,
                                           include_stop_str_in_output=include), use_tqdm=False)
        for o in kept:
            ids = o.outputs[0].token_ids
            shown = ids if include or o.outputs[0].finish_reason != "stop" else ids[:-1]
            assert o.outputs[0].text == tokenizer.decode(shown, skip_special_tokens=False)
        assert any(o.outputs[0].finish_reason == "stop" for o in kept)
    assert_pool_whole(llm.llm_engine)
