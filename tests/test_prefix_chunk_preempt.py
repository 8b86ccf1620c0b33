"""Prefix caching, chunked prefill and both preemption modes: exact outputs, real savings, no leaks."""

from __future__ import annotations

import random

import pytest

from conftest import assert_pool_whole, hf_greedy
from flotilla.engine import LLM, EngineArgs, LLMEngine, SamplingParams


def _prompts(n, lo, hi, vocab, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)


def _run(engine: LLMEngine, prompts, params, salts=None) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params, cache_salt=salts[i] if salts else None)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_forced_preemption_in_both_modes_is_exact(tiny_llama, mode):
    engine = LLMEngine(EngineArgs(model=str(tiny_llama), dtype="float32", num_gpu_blocks_override=10,
                                  max_model_len=160, preemption_mode=mode, swap_space=0.01,
                                  enable_prefix_caching=False))
    prompts = _prompts(6, 20, 40, engine.model_config.vocab_size, seed=11)
    done = _run(engine, prompts, _greedy(24))
    assert engine.scheduler.num_preemptions > 0
    assert (engine.scheduler.num_swap_outs > 0) == (mode == "swap")
    for i, p in enumerate(prompts):
        assert done[str(i)] == hf_greedy(tiny_llama, p, 24)
    assert_pool_whole(engine)


def test_swap_falls_back_to_recompute_when_host_space_runs_out(tiny_llama):
    engine = LLMEngine(EngineArgs(model=str(tiny_llama), dtype="float32", num_gpu_blocks_override=10,
                                  max_model_len=160, preemption_mode="swap", swap_space=2 * 8192 / 2**30,
                                  enable_prefix_caching=False))
    # A block is 8 KiB here (2 layers x K,V x 16 tokens x 2 heads x 16 dims x 4 bytes): two host blocks,
    # too few for most victims.
    assert engine.scheduler.swap_pool.num_blocks == 2
    prompts = _prompts(6, 20, 40, engine.model_config.vocab_size, seed=12)
    done = _run(engine, prompts, _greedy(24))
    assert engine.scheduler.num_preemptions > engine.scheduler.num_swap_outs
    for i, p in enumerate(prompts):
        assert done[str(i)] == hf_greedy(tiny_llama, p, 24)
    assert_pool_whole(engine)


def test_a_shared_1000_token_prefix_is_computed_once(tiny_llama):
    # The tiny model has 512 positions, so its long prefix is 496 tokens (31 blocks); the 1,000-token
    # case runs on SmolLM2 below.
    engine = LLMEngine(EngineArgs(model=str(tiny_llama), dtype="float32"))
    vocab = engine.model_config.vocab_size
    prefix = _prompts(1, 496, 496, vocab, seed=13)[0]
    first, second = prefix + [11, 12, 13], prefix + [21, 22, 23, 24, 25]
    _run(engine, [first], _greedy(4))
    before = engine.stats()
    engine.add_request("b", second, _greedy(4))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    after = engine.stats()
    assert after.computed_prompt_tokens - before.computed_prompt_tokens == len(second) - 496
    assert after.prefix_cache_hits - before.prefix_cache_hits == 496 == out.num_cached_tokens
    assert after.prefix_cache_queries - before.prefix_cache_queries == len(second)
    assert out.outputs[0].token_ids == hf_greedy(tiny_llama, second, 4)
    assert_pool_whole(engine)


def test_cache_salt_keeps_tenants_apart(tiny_llama):
    engine = LLMEngine(EngineArgs(model=str(tiny_llama), dtype="float32"))
    prompt = _prompts(1, 80, 80, engine.model_config.vocab_size, seed=14)[0]
    _run(engine, [prompt], _greedy(2), salts=["tenant-a"])
    hits = engine.stats().prefix_cache_hits
    _run(engine, [prompt], _greedy(2), salts=["tenant-b"])
    assert engine.stats().prefix_cache_hits == hits  # nothing shared across salts
    _run(engine, [prompt], _greedy(2), salts=["tenant-a"])
    assert engine.stats().prefix_cache_hits == hits + 64  # the same tenant hits its own blocks
    assert_pool_whole(engine)


def test_chunked_prefill_never_stalls_running_decodes(tiny_llama):
    engine = LLMEngine(EngineArgs(model=str(tiny_llama), dtype="float32", max_num_batched_tokens=32))
    vocab = engine.model_config.vocab_size
    engine.add_request("short", _prompts(1, 5, 5, vocab, 15)[0], _greedy(20))
    engine.step()
    engine.add_request("long", _prompts(1, 300, 300, vocab, 16)[0], _greedy(2))
    steps_with_decode = 0
    while engine.has_unfinished_requests():
        sched_running = {r.request_id for r in engine.scheduler.running}
        outs = engine.step()
        if "short" in sched_running:
            assert any(o.request_id == "short" for o in outs)  # one token every step, prefill or not
            steps_with_decode += 1
    assert steps_with_decode >= 10
    assert_pool_whole(engine)


@pytest.mark.smollm2
@pytest.mark.parametrize("variant", ["caching-off", "chunked-small-budget", "preempt-recompute", "preempt-swap"])
def test_smollm2_outputs_do_not_depend_on_scheduling(variant, tokenizer):
    chats = [[{"role": "user", "content": q}] for q in
             ("What is 2+2?", "Name a colour.", "Say hello in French.", "What is the capital of Italy?")]
    system = {"role": "system", "content": "You are a concise assistant. " * 8}
    prompts = [tokenizer.apply_chat_template([system, *c], add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for c in chats]
    base = dict(dtype="float32", max_model_len=256)
    variants = {
        "caching-off": dict(enable_prefix_caching=False),
        "chunked-small-budget": dict(max_num_batched_tokens=24),
        # 10 blocks (160 tokens) cannot hold four ~100-token requests even with the shared system prompt.
        "preempt-recompute": dict(num_gpu_blocks_override=10, max_model_len=160),
        "preempt-swap": dict(num_gpu_blocks_override=10, max_model_len=160, preemption_mode="swap",
                             swap_space=0.05),
    }
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)  # long enough to force preemption
    reference = _smollm2_reference(prompts, params)
    llm = LLM(**{**base, **variants[variant]})
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    if variant.startswith("preempt"):
        assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_pool_whole(llm.llm_engine)


_REFERENCE: dict = {}


def _smollm2_reference(prompts, params):
    """Default settings (prefix caching on, chunked prefill, roomy pool), computed once per session."""
    if "ref" not in _REFERENCE:
        llm = LLM(dtype="float32", max_model_len=256)
        _REFERENCE["ref"] = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)]
    return _REFERENCE["ref"]


@pytest.mark.smollm2
def test_smollm2_second_request_computes_only_what_its_1000_token_prefix_lacks(tokenizer):
    engine = LLMEngine(EngineArgs(dtype="float32", max_model_len=1200))
    rng = random.Random(17)
    prefix = [rng.randrange(100, 40000) for _ in range(1008)]  # 63 full blocks
    _run(engine, [prefix + [300, 301]], _greedy(2))
    before = engine.stats()
    engine.add_request("b", prefix + [400, 401, 402], _greedy(2))
    while engine.has_unfinished_requests():
        engine.step()
    after = engine.stats()
    assert after.computed_prompt_tokens - before.computed_prompt_tokens == 3
    assert after.prefix_cache_hits - before.prefix_cache_hits == 1008
    assert_pool_whole(engine)
