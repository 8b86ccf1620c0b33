"""Multi-LoRA in the engine against transformers + peft: each adapter merged into its base model
(``merge_and_unload``) is the oracle for greedy output, while the engine serves the adapters unmerged, several of
them and the base model in one batch. Also: the slots' LRU swapping when more adapters are in use than
``max_loras``, the prefix cache keyed by adapter, tensor-parallel sharding of the adapters, and the adapters an
engine must refuse (with the reason) before any request uses them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_pool_whole, build_tiny, hf_greedy
from lora_fixtures import ALL, build_adapter, peft_greedy

from flotilla.engine import LLM, SamplingParams
from flotilla.engine.lora import LoRARequest
from flotilla.engine.lora.slots import SlotTable

PROMPTS = [[1, 42, 7, 99, 300, 5, 77], [1, 1000, 23, 4, 511, 98, 12, 3, 17], [1, 250, 251, 252]]
STEPS = 12


@pytest.fixture(scope="module")
def llama_with_adapters(tmp_path_factory, tokenizer):
    base = build_tiny("llama", tmp_path_factory.mktemp("lora-base"), tokenizer)
    adapters = {
        # attention only, rank 8
        "sql": build_adapter(base, tmp_path_factory.mktemp("a-sql"), 1, targets=["q_proj", "v_proj"]),
        # every projection, rank 16 under rsLoRA, one module's alpha overridden
        "chat": build_adapter(base, tmp_path_factory.mktemp("a-chat"), 2, rank=16, alpha=8, use_rslora=True,
                              alpha_pattern={"down_proj": 32}),
        # MLP only, rank 4
        "math": build_adapter(base, tmp_path_factory.mktemp("a-math"), 3, targets=["gate_proj", "up_proj",
                                                                                   "down_proj"], rank=4),
        "code": build_adapter(base, tmp_path_factory.mktemp("a-code"), 4, rank=8),
    }
    return base, adapters


def _requests(adapters: dict[str, Path]) -> dict[str, LoRARequest]:
    return {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(sorted(adapters.items()))}


def _greedy_params():
    return SamplingParams(temperature=0, max_tokens=STEPS, min_tokens=STEPS)


def test_slot_table_keeps_loaded_adapters_and_evicts_the_least_recently_used():
    t = SlotTable(2)
    assert t.assign([7, 7, 9]) == [(0, 7), (1, 9)]
    assert t.assign([9]) == []  # already there
    assert t.assign([11]) == [(0, 11)]  # 7 was used least recently
    assert t.assign([9, 7]) == [(0, 7)]  # 9 stays; 11 goes
    assert t.assign([5]) == [(1, 5)]  # 9 was used before 7
    with pytest.raises(ValueError, match="max_loras"):
        t.assign([1, 2, 3])


def test_a_batch_mixing_adapters_and_the_base_model_equals_peft_merged(llama_with_adapters):
    base, adapters = llama_with_adapters
    reqs = _requests(adapters)
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=4, max_lora_rank=16,
              num_gpu_blocks_override=128)
    plan = [(p, name) for p in PROMPTS for name in ("sql", "chat", "math", None)]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in plan], _greedy_params(), use_tqdm=False,
                        lora_request=[reqs[n] if n else None for _, n in plan])
    got = {(tuple(p), n): o.outputs[0].token_ids for (p, n), o in zip(plan, outs)}
    for p in PROMPTS:
        assert got[(tuple(p), None)] == hf_greedy(base, p, STEPS)
        for name in ("sql", "chat", "math"):
            assert got[(tuple(p), name)] == peft_greedy(base, adapters[name], p, STEPS), name
    # every adapter changes the output of some prompt (else the comparison above proves nothing)
    for name in ("sql", "chat", "math"):
        assert any(got[(tuple(p), name)] != got[(tuple(p), None)] for p in PROMPTS), name
    assert outs[0].lora_request == reqs["sql"] and outs[3].lora_request is None
    assert_pool_whole(llm.llm_engine)


def test_more_adapters_than_slots_swap_through_them_lru(llama_with_adapters):
    """Four adapters through two slots: the scheduler holds back requests whose adapter has no slot while two
    others run, and slots are refilled from host memory as adapters finish (max_cpu_loras 2: some from disk)."""
    base, adapters = llama_with_adapters
    reqs = _requests(adapters)
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=16,
              num_gpu_blocks_override=128)
    names = ["sql", "chat", "math", "code", "sql", "chat"]
    prompt = PROMPTS[1]
    outs = llm.generate([{"prompt_token_ids": prompt}] * len(names), _greedy_params(), use_tqdm=False,
                        lora_request=[reqs[n] for n in names])
    for name, out in zip(names, outs):
        assert out.outputs[0].token_ids == peft_greedy(base, adapters[name], prompt, STEPS), name
    manager = llm.llm_engine.runner.lora
    assert manager.loads >= 4 and len(manager.cached()) <= 2
    assert_pool_whole(llm.llm_engine)


def test_an_adapter_whose_folder_vanished_fails_its_own_requests_only(llama_with_adapters, tmp_path):
    """Registered, then its folder deleted and its host copy evicted (max_cpu_loras 1): its request ends with an
    error naming the adapter, the others in the same batch finish with the right output, the engine serves on."""
    import shutil

    base, adapters = llama_with_adapters
    doomed = shutil.copytree(adapters["math"], tmp_path / "doomed")
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=16,
              num_gpu_blocks_override=128)
    engine = llm.llm_engine
    gone, sql = LoRARequest("doomed", 1, str(doomed)), LoRARequest("sql", 2, str(adapters["sql"]))
    assert engine.add_lora(gone) and engine.add_lora(sql)  # sql's read evicts doomed's host copy
    shutil.rmtree(doomed)
    outs = llm.generate([{"prompt_token_ids": PROMPTS[0]}] * 3, _greedy_params(), use_tqdm=False,
                        lora_request=[sql, gone, None])
    assert outs[1].error is not None and "doomed" in outs[1].error and outs[1].outputs[0].finish_reason == "error"
    assert outs[0].outputs[0].token_ids == peft_greedy(base, adapters["sql"], PROMPTS[0], STEPS)
    assert outs[2].outputs[0].token_ids == hf_greedy(base, PROMPTS[0], STEPS)
    assert_pool_whole(engine)


def test_the_prefix_cache_is_keyed_by_adapter(llama_with_adapters):
    base, adapters = llama_with_adapters
    reqs = _requests(adapters)
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=2, num_gpu_blocks_override=128)
    prompt = list(range(100, 164))  # four full blocks
    one = SamplingParams(temperature=0, max_tokens=1)

    def cached(lora):
        return llm.generate({"prompt_token_ids": prompt}, one, use_tqdm=False, lora_request=lora)[0].num_cached_tokens

    assert cached(reqs["sql"]) == 0
    assert cached(reqs["sql"]) == 48  # the same adapter reuses its blocks (the last token is always computed)
    assert cached(None) == 0  # the base model's K/V differ: nothing shared
    assert cached(reqs["math"]) == 0
    assert cached(None) == 48


@pytest.mark.parametrize("variant", ["phi3", "qwen2"])
def test_fused_and_biased_projections_equal_peft_merged(variant, tmp_path, tokenizer):
    """Phi-3 stores q/k/v and gate/up fused (a LoRA on qkv_proj is split into its parts); Qwen2's q/k/v carry
    biases."""
    base = build_tiny(variant, tmp_path / "base", tokenizer)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if variant == "phi3" else ALL
    adapter = build_adapter(base, tmp_path / "adapter", 5, targets=targets)
    llm = LLM(str(base), dtype="float32", enable_lora=True, num_gpu_blocks_override=64)
    out = llm.generate({"prompt_token_ids": PROMPTS[0]}, _greedy_params(), use_tqdm=False,
                       lora_request=LoRARequest("a", 1, str(adapter)))[0].outputs[0].token_ids
    assert out == peft_greedy(base, adapter, PROMPTS[0], STEPS)
    assert out != hf_greedy(base, PROMPTS[0], STEPS)


@pytest.mark.slow
def test_tensor_parallel_ranks_shard_the_adapters(llama_with_adapters):
    """Two CPU ranks: column layers take their rows of B, row layers their columns of A (added before the
    all-reduce); the output is still peft's."""
    base, adapters = llama_with_adapters
    reqs = _requests(adapters)
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16, tensor_parallel_size=2,
              num_gpu_blocks_override=64)
    try:
        outs = llm.generate([{"prompt_token_ids": PROMPTS[0]}] * 3, _greedy_params(), use_tqdm=False,
                            lora_request=[reqs["chat"], None, reqs["sql"]])
        assert outs[0].outputs[0].token_ids == peft_greedy(base, adapters["chat"], PROMPTS[0], STEPS)
        assert outs[1].outputs[0].token_ids == hf_greedy(base, PROMPTS[0], STEPS)
        assert outs[2].outputs[0].token_ids == peft_greedy(base, adapters["sql"], PROMPTS[0], STEPS)
    finally:
        llm.llm_engine.shutdown()


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_adapters_the_engine_cannot_serve_are_refused_with_the_reason(llama_with_adapters, tmp_path, tokenizer):
    import shutil

    base, adapters = llama_with_adapters
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_lora_rank=8, num_gpu_blocks_override=64)
    engine = llm.llm_engine

    def refused(folder, match, name="bad"):
        with pytest.raises(ValueError, match=match):
            engine.add_lora(LoRARequest(name, 99, str(folder)))

    refused(adapters["chat"], "rank 16, over --max-lora-rank 8")
    for change, match in [({"use_dora": True}, "DoRA"), ({"bias": "all"}, "biases"),
                          ({"modules_to_save": ["lm_head"]}, "modules_to_save")]:
        folder = tmp_path / next(iter(change))
        shutil.copytree(adapters["sql"], folder)
        _edit_config(folder, **change)
        refused(folder, match)
    refused(tmp_path / "nowhere", "lora_path")
    other = build_tiny("llama", tmp_path / "wide", tokenizer, hidden_size=96)
    refused(build_adapter(other, tmp_path / "wide-adapter", 6, targets=["q_proj"]), "another base model")
    # nothing was registered, and a good adapter still loads
    assert engine.list_loras() == set()
    assert engine.add_lora(LoRARequest("sql", 1, str(adapters["sql"]))) is True
    assert engine.add_lora(LoRARequest("sql", 1, str(adapters["sql"]))) is False
    refused(adapters["math"], "already been loaded", name="sql")
    # unloaded: gone for new requests, and its id is never taken again (a request racing the unload fails)
    assert engine.remove_lora(1) is True and engine.remove_lora(1) is False and engine.list_loras() == set()
    with pytest.raises(ValueError, match="since unloaded"):
        llm.generate("hi", use_tqdm=False, lora_request=LoRARequest("sql", 1, str(adapters["sql"])))
    assert engine.add_lora(LoRARequest("sql", engine.lora.new_id(), str(adapters["sql"]))) is True
    with pytest.raises(ValueError, match="enable_lora"):
        LLM(str(base), dtype="float32", num_gpu_blocks_override=64).generate(
            "hi", use_tqdm=False, lora_request=LoRARequest("sql", 1, str(adapters["sql"])))


def test_mixture_of_experts_layers_take_no_lora(tmp_path, tokenizer):
    base = build_tiny("mixtral", tmp_path / "base", tokenizer)
    llm = LLM(str(base), dtype="float32", enable_lora=True, num_gpu_blocks_override=64)
    attention_only = build_adapter(base, tmp_path / "attn", 7, targets=["q_proj", "o_proj"])
    out = llm.generate({"prompt_token_ids": PROMPTS[0]}, _greedy_params(), use_tqdm=False,
                       lora_request=LoRARequest("attn", 1, str(attention_only)))[0].outputs[0].token_ids
    assert out == peft_greedy(base, attention_only, PROMPTS[0], STEPS)
    experts = build_adapter(base, tmp_path / "experts", 8, targets=["w1", "w2", "w3"])
    with pytest.raises(ValueError, match="not served|mixture"):
        llm.llm_engine.add_lora(LoRARequest("experts", 2, str(experts)))
