"""Structured output (guided decoding) in the engine: what each kind of grammar yields, against transformers'
``generate()`` guided by xgrammar's own logits processor, in batches with everything else a request can do
(unguided neighbours, n > 1 with seeds, preemption), with a compilation that keeps a request waiting and one that
fails."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from conftest import assert_pool_whole, run_to_completion as run, hf_model
from flotilla.engine import EngineArgs, LLMEngine, SamplingParams
from flotilla.engine.structured_output import GuidedDecodingParams, StructuredOutputs, StructuredOutputsParams

xgr = pytest.importorskip("xgrammar")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
COLOURS = ["red", "green", "blue", "dark purple"]
EBNF = 'root ::= answer "." \nanswer ::= "yes" | "no" | ("maybe " [a-z]+)'
EBNF_PYTHON = r"(yes|no|maybe [a-z]+)\."


def chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def valid(kind: str, text: str) -> bool:
    if kind == "json":
        try:
            jsonschema.validate(json.loads(text), PERSON)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if kind == "json_object":
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False
    pattern = {"regex": PHONE, "choice": "|".join(map(re.escape, COLOURS)), "grammar": EBNF_PYTHON}[kind]
    return re.fullmatch(pattern, text) is not None


CASES = {
    "json": ("Describe the site's newest user as JSON.", GuidedDecodingParams(json=PERSON)),
    "regex": ("What is the office phone number?", GuidedDecodingParams(regex=PHONE)),
    "choice": ("Pick a colour for the logo.", GuidedDecodingParams(choice=COLOURS)),
    "grammar": ("Will it rain tomorrow?", GuidedDecodingParams(grammar=EBNF)),
}


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    return LLMEngine(EngineArgs(model=str(smollm2_dir), dtype="float32", max_model_len=512, seed=0))


def hf_guided_greedy(folder, prompt_ids: list[int], params: GuidedDecodingParams, max_new_tokens: int) -> list[int]:
    """transformers' greedy generate() steered by xgrammar's own Hugging Face logits processor."""
    from flotilla.engine.structured_output import parse
    from transformers import AutoTokenizer

    model = hf_model(folder)
    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(str(folder)),
                                              vocab_size=model.config.vocab_size)
    compiled = xgr.GrammarCompiler(info).compile_grammar(parse(params))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=[xgr.contrib.hf.LogitsProcessor(compiled)])
    return out[0, len(prompt_ids):].tolist()


# ---- parameters -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of json, regex, choice, grammar, json_object must be set, got none"),
    (dict(regex="a", choice=["a"]), "got regex, choice"),
    (dict(regex="a", backend="outlines"), "backend 'outlines' is not available"),
    (dict(regex="a", whitespace_pattern=r"\s*"), "whitespace_pattern is not supported"),
    (dict(choice=[]), "choice must be a non-empty list of strings"),
    (dict(choice=["a", 3]), "choice must be a non-empty list of strings"),
])
def test_guided_decoding_params_are_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GuidedDecodingParams(**kwargs)


def test_structured_outputs_is_the_same_thing_under_vllms_newer_name():
    g = StructuredOutputsParams(regex="a+")
    assert SamplingParams(structured_outputs=g).guided_decoding is g
    assert SamplingParams(guided_decoding=g).structured_outputs is g
    with pytest.raises(ValueError, match="^structured_outputs: give guided_decoding or structured_outputs"):
        SamplingParams(guided_decoding=g, structured_outputs=GuidedDecodingParams(regex="b"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(json="{not json"), "guided_decoding: the JSON schema is not valid JSON"),
    (dict(json={"type": "strange"}), 'guided_decoding: invalid JSON schema: Unsupported type "strange"'),
    (dict(json="[1, 2]"), "guided_decoding: a JSON schema must be an object"),
    (dict(regex="(ab"), "guided_decoding: invalid regex: "),
    (dict(grammar="root ::= "), "guided_decoding: invalid grammar: "),
])
def test_an_invalid_grammar_is_refused_at_admission_and_the_engine_goes_on(engine, kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        engine.add_request("bad", [1, 2, 3], SamplingParams(guided_decoding=GuidedDecodingParams(**kwargs)))
    assert not engine.has_unfinished_requests()
    assert run(engine, {"ok": ([1, 2, 3], SamplingParams(max_tokens=3))})["ok"].finished


# ---- outputs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CASES))
def test_greedy_guided_output_equals_transformers_with_xgrammars_processor(engine, smollm2_dir, tokenizer, kind):
    question, params = CASES[kind]
    prompt = chat_ids(tokenizer, question)
    out = run(engine, {kind: (prompt, SamplingParams(temperature=0.0, max_tokens=160, guided_decoding=params))})[kind]
    c = out.outputs[0]
    assert c.token_ids == hf_guided_greedy(smollm2_dir, prompt, params, 160)
    assert c.finish_reason == "stop" and valid(kind, c.text), c.text


def test_a_batch_mixes_every_kind_with_unguided_requests_each_as_if_alone(engine, tokenizer):
    plain = (chat_ids(tokenizer, "Write a haiku about the sea."), SamplingParams(temperature=0.0, max_tokens=24))
    alone = run(engine, {"plain": plain})["plain"].outputs[0].token_ids
    requests = {kind: (chat_ids(tokenizer, q), SamplingParams(temperature=0.0, max_tokens=160, guided_decoding=g))
                for kind, (q, g) in CASES.items()}
    requests["json_object"] = (chat_ids(tokenizer, "Give the capital of Italy as a JSON object with key capital."),
                               SamplingParams(temperature=0.0, max_tokens=160,
                                              guided_decoding=GuidedDecodingParams(json_object=True)))
    requests["plain"] = plain
    done = run(engine, requests)
    assert done["plain"].outputs[0].token_ids == alone
    for kind in [*CASES, "json_object"]:
        c = done[kind].outputs[0]
        assert c.finish_reason == "stop" and valid(kind, c.text), (kind, c.text)
    assert_pool_whole(engine)


def test_n_samples_with_a_seed_each_follow_the_grammar_and_reproduce(engine, tokenizer):
    prompt = chat_ids(tokenizer, "Describe three different users as JSON.")
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=200, guided_decoding=GuidedDecodingParams(json=PERSON))
    first = run(engine, {"a": (prompt, params)})["a"].outputs
    again = run(engine, {"b": (prompt, params)})["b"].outputs
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert len({tuple(c.token_ids) for c in first}) > 1  # four samples, not four copies
    for c in first:
        assert c.finish_reason == "stop" and valid("json", c.text), c.text


def test_preempted_guided_requests_resume_where_their_grammar_was(smollm2_dir, tokenizer):
    requests = {f"{kind}{i}": (chat_ids(tokenizer, f"{q} Variant {i}."),
                               SamplingParams(temperature=0.0, max_tokens=120, guided_decoding=g))
                for i in range(3) for kind, (q, g) in CASES.items()}
    roomy = LLMEngine(EngineArgs(model=str(smollm2_dir), dtype="float32", max_model_len=256, seed=0))
    expected = {rid: out.outputs[0].token_ids for rid, out in run(roomy, requests).items()}
    tight = LLMEngine(EngineArgs(model=str(smollm2_dir), dtype="float32", max_model_len=256, seed=0,
                                 num_gpu_blocks_override=24))
    done = run(tight, requests)
    assert tight.scheduler.num_preemptions > 0
    assert {rid: out.outputs[0].token_ids for rid, out in done.items()} == expected
    assert_pool_whole(tight)


def test_a_request_waits_for_its_grammar_without_holding_up_the_others(engine, tokenizer, monkeypatch):
    structured = engine.structured_outputs()
    gate = threading.Event()
    compile_ = structured._compile

    def slow(grammar, kind):
        gate.wait()
        return compile_(grammar, kind)

    monkeypatch.setattr(structured, "_compile", slow)
    guided = SamplingParams(temperature=0.0, max_tokens=40, guided_decoding=GuidedDecodingParams(regex=r"[0-9]{6}"))
    engine.add_request("guided", chat_ids(tokenizer, "Give me a code."), guided)
    engine.add_request("plain", chat_ids(tokenizer, "Hello!"), SamplingParams(temperature=0.0, max_tokens=8))
    finished = {}
    while "plain" not in finished:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert "guided" not in finished and engine.scheduler.waiting[0].request_id == "guided"
    assert engine.grammars_blocking()  # nothing else to do: the loop would wait on the compilation
    gate.set()
    done = run(engine, {})
    assert re.fullmatch(r"[0-9]{6}", done["guided"].outputs[0].text)
    assert_pool_whole(engine)


def test_a_grammar_that_fails_to_compile_fails_its_request_alone(engine, tokenizer, monkeypatch):
    structured = engine.structured_outputs()

    def broken(grammar, kind):
        raise MemoryError("no room for the token mask cache")

    monkeypatch.setattr(structured, "_compile", broken)
    doomed = SamplingParams(max_tokens=8, guided_decoding=GuidedDecodingParams(regex=r"[a-f]{7}"))
    done = run(engine, {"doomed": ([5, 6, 7], doomed), "fine": ([5, 6, 7], SamplingParams(max_tokens=8))})
    assert done["doomed"].error.startswith("grammar compilation failed: MemoryError")
    assert done["doomed"].outputs[0].finish_reason == "error"
    assert done["fine"].error is None and len(done["fine"].outputs[0].token_ids) == 8
    monkeypatch.undo()
    # The failure is not cached: the same grammar compiles for the next request.
    again = run(engine, {"again": ([5, 6, 7], doomed)})["again"]
    assert again.error is None and re.fullmatch(r"[a-f]{7}", again.outputs[0].text)
    assert_pool_whole(engine)


def test_equal_grammars_compile_once(tokenizer):
    structured = StructuredOutputs(tokenizer, 49152, {2})
    a = structured.prepare(GuidedDecodingParams(json={"type": "object", "properties": {"x": {"type": "integer"}}}))
    b = structured.prepare(GuidedDecodingParams(json='{"properties": {"x": {"type": "integer"}}, "type": "object"}'))
    c = structured.prepare(GuidedDecodingParams(json={"type": "object"}, disable_any_whitespace=True))
    assert a is b and a is not c
    assert a.result().memory_size_bytes > 0
    structured.shutdown()
