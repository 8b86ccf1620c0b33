"""Request isolation inside the engine: every token id a request carries is checked at admission, a request
whose own processing raises is stopped alone (its blocks freed, the batch unchanged), and a failure of the
loop itself reaches every caller at once instead of hanging them."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest
import torch

from conftest import assert_pool_whole, run_to_completion as run
from flotilla.engine import AsyncLLMEngine, EngineArgs, LLMEngine, SamplingParams
from flotilla.engine.errors import EngineDeadError, QueueFullError, RequestFailedError
from flotilla.engine.outputs import RequestMetrics
from flotilla.engine.request import Request
from flotilla.engine.sampler import _ban_bad_words

PROMPTS = [[5, 17, 300, 42, 9], [1000, 2000, 3000], [7] * 20]
GREEDY = dict(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine(EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=128))


@pytest.mark.parametrize("field, kwargs", [
    ("logit_bias", dict(logit_bias={99_999_999: 5.0})),
    ("logit_bias", dict(logit_bias={-1: 5.0})),
    ("stop_token_ids", dict(min_tokens=2, stop_token_ids=[99_999_999])),
    ("allowed_token_ids", dict(allowed_token_ids=[3, 10**9])),
])
def test_token_ids_outside_the_vocabulary_are_refused_at_admission(engine, field, kwargs):
    with pytest.raises(ValueError, match=f"^{field}: token ids must be in \\[0, {engine.model_config.vocab_size}\\)"):
        engine.add_request("bad", PROMPTS[0], SamplingParams(max_tokens=4, **kwargs))
    assert not engine.has_unfinished_requests()
    assert run(engine, {"ok": (PROMPTS[0], SamplingParams(**GREEDY))})["ok"].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("field, kwargs", [
    ("temperature", dict(temperature=math.nan)),
    ("top_p", dict(top_p=math.nan)),
    ("min_p", dict(min_p=math.inf)),
    ("repetition_penalty", dict(repetition_penalty=math.nan)),
    ("presence_penalty", dict(presence_penalty=-math.inf)),
    ("logit_bias", dict(logit_bias={5: math.nan})),
    ("seed", dict(seed=2**64)),
    ("allowed_token_ids", dict(allowed_token_ids=[])),
    ("bad_words", dict(bad_words=["  "])),
    ("logits_processors", dict(logits_processors=["not callable"])),
])
def test_non_finite_and_malformed_values_raise_naming_the_field(field, kwargs):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kwargs)


def test_logit_bias_is_clamped_to_openais_range_as_vllm_does():
    assert SamplingParams(logit_bias={5: 1e9, 6: -1e9}).logit_bias == {5: 100.0, 6: -100.0}


def test_a_raising_logits_processor_fails_only_its_request(engine):
    alone = run(engine, {f"a{i}": (p, SamplingParams(**GREEDY)) for i, p in enumerate(PROMPTS)})
    calls = []

    def explodes_on_the_third_token(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        calls.append(len(output_ids))
        if len(output_ids) == 3:
            raise KeyError("boom from a user's processor")
        return logits

    mixed = run(engine, {
        "b0": (PROMPTS[0], SamplingParams(**GREEDY)),
        "bad": (PROMPTS[1], SamplingParams(logits_processors=[explodes_on_the_third_token], **GREEDY)),
        "b2": (PROMPTS[2], SamplingParams(**GREEDY)),
    })
    failed = mixed["bad"]
    assert failed.finished and failed.outputs[0].finish_reason == "error"
    assert "KeyError" in failed.error and "boom from a user's processor" in failed.error
    assert failed.outputs[0].token_ids == alone["a1"].outputs[0].token_ids[:3] and calls == [0, 1, 2, 3]
    # The rest of the batch is exactly what it is without the failing request.
    assert mixed["b0"].outputs[0].token_ids == alone["a0"].outputs[0].token_ids
    assert mixed["b2"].outputs[0].token_ids == alone["a2"].outputs[0].token_ids
    assert mixed["b0"].error is None and engine.stats().request_errors >= 1
    assert_pool_whole(engine)


def test_a_failing_sample_stops_all_n_of_its_sequences(engine):
    def explodes(prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) == 2:
            raise RuntimeError("boom")
        return logits

    out = run(engine, {"n3": (PROMPTS[0], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8,
                                                         logits_processors=[explodes]))})["n3"]
    assert [c.finish_reason for c in out.outputs] == ["error"] * 3
    assert_pool_whole(engine)


def test_logits_processors_see_prompt_and_output_and_steer_sampling(engine):
    seen = []

    def force_42(prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen.append((list(prompt_ids), list(output_ids)))
        forced = torch.full_like(logits, -math.inf)
        forced[42] = 0.0
        return forced

    out = run(engine, {"p": (PROMPTS[0], SamplingParams(logits_processors=[force_42], **GREEDY))})["p"]
    assert out.outputs[0].token_ids == [42] * 10
    assert seen[0] == (PROMPTS[0], []) and seen[-1] == (PROMPTS[0], [42] * 9)


def test_allowed_token_ids_restrict_every_sampled_token(engine):
    allowed = [11, 222, 3333]
    out = run(engine, {"a": (PROMPTS[0], SamplingParams(temperature=1.0, seed=3, max_tokens=20, ignore_eos=True,
                                                        allowed_token_ids=allowed))})["a"]
    assert len(out.outputs[0].token_ids) == 20 and set(out.outputs[0].token_ids) <= set(allowed)


def test_bad_words_never_appear_in_the_output(engine):
    tok = engine.tokenizer
    free = run(engine, {"f": (PROMPTS[2], SamplingParams(**GREEDY))})["f"].outputs[0].token_ids
    word = tok.decode([free[0]]).strip()
    assert word, "the tiny model's first greedy token decodes to whitespace; pick another prompt"
    out = run(engine, {"b": (PROMPTS[2], SamplingParams(bad_words=[word], **GREEDY))})["b"].outputs[0]
    banned = [ids for ids in engine._bad_words_token_ids([word]) if len(ids) == 1]
    assert banned and not {ids[0] for ids in banned} & set(out.token_ids)
    assert out.token_ids[0] != free[0]


def test_a_multi_token_bad_word_is_banned_only_after_its_prefix():
    params = SamplingParams().bind(frozenset(), [[4, 5, 6]])
    req = Request("r", [1, 2], params, RequestMetrics(0.0), 64)
    for prefix, banned in (([9, 4, 5], True), ([9, 4, 7], False), ([5], False)):
        req.output_token_ids = list(prefix)
        row = torch.zeros(10)
        _ban_bad_words(row, req)
        assert bool(row[6] == -math.inf) is banned and torch.isfinite(row[[0, 1, 2, 3, 4, 5, 7, 8, 9]]).all()


def test_an_async_caller_gets_request_failed_and_others_finish(engine):
    def explodes(output_ids, logits):
        if output_ids:
            raise ValueError("bad row")  # even a ValueError mid-flight is a failure, not a 400
        return logits

    async def main():
        aengine = AsyncLLMEngine(engine)
        try:
            async def last(rid, params, prompt):
                out = None
                async for out in aengine.generate({"prompt_token_ids": prompt}, params, rid):
                    pass
                return out

            good = asyncio.create_task(last("g", SamplingParams(**GREEDY), PROMPTS[0]))
            with pytest.raises(RequestFailedError, match="bad row"):
                await last("x", SamplingParams(logits_processors=[explodes], **GREEDY), PROMPTS[1])
            return await good
        finally:
            aengine.shutdown()

    assert asyncio.run(main()).outputs[0].finish_reason == "length"
    assert_pool_whole(engine)


def test_a_dead_loop_fails_every_caller_and_calls_on_dead(tiny_llama):
    engine = LLMEngine(EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=128))
    step, gate = engine.step, threading.Event()

    def failing_step():
        gate.wait(30)  # both requests are queued before the loop fails
        raise MemoryError("injected: out of memory in the forward pass")

    engine.step = failing_step
    dead: list[BaseException] = []

    async def main():
        aengine = AsyncLLMEngine(engine, on_dead=dead.append)

        async def consume(rid):
            async for _ in aengine.generate(PROMPTS[0], SamplingParams(**GREEDY), rid):
                pass

        tasks = [asyncio.create_task(consume(f"r{i}")) for i in range(2)]
        while aengine.num_unfinished() < 2:
            await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(EngineDeadError):
            await consume("late")
        aengine.shutdown()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, EngineDeadError) and "out of memory" in str(r) for r in results), results
    assert len(dead) == 1 and isinstance(dead[0], MemoryError)
    engine.step = step


def test_queue_admission_is_atomic_under_a_burst(tiny_llama):
    engine = LLMEngine(EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=128, max_num_seqs=4))
    step, gate = engine.step, threading.Event()

    def paused_step():
        gate.wait(60)  # nothing leaves the queue while the burst arrives
        return step()

    engine.step = paused_step

    async def main():
        aengine = AsyncLLMEngine(engine, max_queue_len=8)

        async def one(i):
            async for out in aengine.generate([5, 6, i + 7], SamplingParams(max_tokens=3), f"q{i}"):
                pass
            return out

        tasks = [asyncio.create_task(one(i)) for i in range(40)]
        while sum(t.done() for t in tasks) < 32:  # the refusals come back at once
            await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        aengine.shutdown()
        return results

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, QueueFullError)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(refused) == 32 and len(served) == 8, results
    assert_pool_whole(engine)
