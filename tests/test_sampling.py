"""Sampling parameters behave as vLLM documents them, checked against transformers' own logits."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_pool_whole, hf_model
from flotilla.engine import LLM, SamplingParams

PROMPTS = [[5, 17, 300, 42, 9], [1000, 2000, 3000], [7] * 20]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", seed=0)


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def _gen(llm, prompts, params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=77)
    alone = _gen(llm, [PROMPTS[0]], params)[0].outputs[0].token_ids
    again = _gen(llm, [PROMPTS[0]], params)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=12)
    mixed = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[1:]] + [{"prompt_token_ids": PROMPTS[0]}],
                         [unseeded, unseeded, params], use_tqdm=False)
    assert alone == again == mixed[2].outputs[0].token_ids
    other_seed = _gen(llm, [PROMPTS[0]], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=78))
    assert other_seed[0].outputs[0].token_ids != alone
    assert_pool_whole(llm.llm_engine)


def test_n_samples_with_a_seed_are_distinct_but_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.5, max_tokens=10, seed=5)
    a = _gen(llm, [PROMPTS[1]], params)[0]
    b = _gen(llm, [PROMPTS[1]], params)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3


def test_top_k_1_is_greedy_and_temperature_0_ignores_the_seed(llm):
    greedy = _ids(_gen(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=8)))
    topk1 = _ids(_gen(llm, PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_tokens=8, seed=3)))
    tiny_p = _ids(_gen(llm, PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8)))
    assert greedy == topk1 == tiny_p


def test_min_p_one_keeps_only_the_most_likely_token(llm):
    greedy = _ids(_gen(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=8)))
    assert _ids(_gen(llm, PROMPTS, SamplingParams(temperature=1.0, min_p=1.0, max_tokens=8))) == greedy


def test_logit_bias_forces_a_token(llm):
    out = _gen(llm, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=5, logit_bias={1234: 100.0}))
    assert out[0].outputs[0].token_ids == [1234] * 5


def test_repetition_penalty_changes_greedy_choice_as_transformers_does(llm, tiny_llama):
    from transformers import RepetitionPenaltyLogitsProcessor

    prompt = PROMPTS[2]
    out = _gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=6, repetition_penalty=1.8,
                                              ignore_eos=True))[0].outputs[0].token_ids
    model = hf_model(tiny_llama)
    proc = RepetitionPenaltyLogitsProcessor(1.8)
    ids = torch.tensor([prompt])
    for _ in range(6):
        with torch.no_grad():
            logits = model(ids).logits[:, -1]
        ids = torch.cat([ids, proc(ids, logits).argmax(-1, keepdim=True)], dim=1)
    assert out == ids[0, len(prompt):].tolist()


def test_frequency_and_presence_penalties_follow_the_openai_formula(llm, tiny_llama):
    # logits[t] -= frequency * count_in_output(t) + presence * (count_in_output(t) > 0)
    prompt, steps = PROMPTS[2], 8
    out = _gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=steps, frequency_penalty=1.5,
                                              presence_penalty=0.5))[0].outputs[0].token_ids
    model = hf_model(tiny_llama)
    generated: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + generated])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[0]).float()
        logits -= 1.5 * counts + 0.5 * (counts > 0).float()
        generated.append(int(logits.argmax()))
    assert out == generated
    plain = _gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=steps))[0].outputs[0].token_ids
    assert plain != generated  # the penalty mattered on this prompt


def test_logprobs_match_transformers_log_softmax(llm, tiny_llama):
    prompt = PROMPTS[0]
    out = _gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2))[0]
    model = hf_model(tiny_llama)
    full = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
    comp = out.outputs[0]
    cum = 0.0
    for j, (token, lp) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(prompt) - 1 + j]
        assert lp[token].rank == 1  # greedy picks the top token
        assert math.isclose(lp[token].logprob, float(row[token]), abs_tol=1e-4)
        top3 = row.topk(3).indices.tolist()
        assert set(top3) <= set(lp)
        cum += lp[token].logprob
    assert math.isclose(comp.cumulative_logprob, cum, abs_tol=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert math.isclose(entry[prompt[pos]].logprob, float(ref[pos - 1, prompt[pos]]), abs_tol=1e-4)


def test_stop_token_ids_and_max_tokens_set_finish_reasons(llm):
    greedy = _gen(llm, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 8
    stop_at = greedy.token_ids[3]
    first = greedy.token_ids.index(stop_at)
    out = _gen(llm, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids == greedy.token_ids[: first + 1]
    assert_pool_whole(llm.llm_engine)


def test_stop_strings_trim_the_text(llm, tokenizer):
    greedy = _gen(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    text = greedy.text
    assert len(text) > 6
    stop = text[3:6]
    out = _gen(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    inc = _gen(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, stop=stop,
                                                 include_stop_str_in_output=True))[0].outputs[0]
    assert inc.text == text[: text.index(stop) + len(stop)]
