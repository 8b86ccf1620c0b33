"""The public API surfaces: LLM, LLMEngine, AsyncLLMEngine — bad input, aborts, metrics, chat."""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import assert_pool_whole
from flotilla.engine import LLM, AsyncLLMEngine, EngineArgs, LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine(EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=128))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=0), "n"),
        (dict(min_p=2.0), "min_p"),
        (dict(best_of_mistake=3), "best_of_mistake"),
    ],
)
def test_bad_sampling_params_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected_and_the_engine_keeps_serving(engine):
    with pytest.raises(ValueError, match="prompt.*max_model_len"):
        engine.add_request("long", list(range(5, 205)), SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        engine.add_request("empty", "", SamplingParams())
    with pytest.raises(ValueError, match="prompt: token ids"):
        engine.add_request("oov", [10**9], SamplingParams())
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(model="x", max_num_seqz=4)
    assert not engine.has_unfinished_requests()
    engine.add_request("ok", "hello there", SamplingParams(temperature=0, max_tokens=3))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    assert_pool_whole(engine)


def test_abort_frees_blocks_and_reports_abort(engine):
    engine.add_request("x", list(range(10, 60)), SamplingParams(temperature=0, max_tokens=50))
    engine.add_request("y", list(range(10, 30)), SamplingParams(temperature=0, max_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    (out,) = engine.abort_request("x")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    engine.abort_request(["y", "never-existed"])
    assert_pool_whole(engine)


def test_metrics_and_stats_move(engine):
    before = engine.stats()
    engine.add_request("m", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=5))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    m = final.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    after = engine.stats()
    assert after.generation_tokens - before.generation_tokens == 5
    assert after.prompt_tokens - before.prompt_tokens == 4
    assert after.num_running == after.num_waiting == 0 and after.kv_cache_usage == 0.0


def test_output_kind_final_only_yields_one_output_when_the_request_ends(engine, tiny_llama):
    from flotilla.engine import RequestOutputKind

    seen: dict[str, list] = {"every": [], "final": []}
    engine.add_request("every", [5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine.add_request("final", [5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                          output_kind=RequestOutputKind.FINAL_ONLY))
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert [len(o.outputs[0].token_ids) for o in seen["every"]] == [1, 2, 3, 4, 5, 6]  # CUMULATIVE, the default
    (final,) = seen["final"]
    assert final.finished and final.outputs[0].token_ids == seen["every"][-1].outputs[0].token_ids
    assert final.outputs[0].finish_reason == "length" and final.metrics.finished_time is not None
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind=RequestOutputKind.DELTA)
    # LLM.generate asks for final outputs only, on its own copies of the caller's params
    params = SamplingParams(temperature=0, max_tokens=2)
    llm = LLM(str(tiny_llama), dtype="float32", max_model_len=128)
    (out,) = llm.generate(["hello"], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 2 and params.output_kind == RequestOutputKind.CUMULATIVE
    assert_pool_whole(engine)
    assert_pool_whole(llm.llm_engine)


def test_async_generate_streams_and_cancelling_aborts(tiny_llama):
    async_engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=str(tiny_llama), dtype="float32"))

    async def scenario():
        params = SamplingParams(temperature=0, max_tokens=6)
        seen = [out async for out in async_engine.generate("Once upon a time", params, "s1")]
        assert [len(o.outputs[0].token_ids) for o in seen] == [1, 2, 3, 4, 5, 6] and seen[-1].finished

        with pytest.raises(ValueError, match="max_tokens"):
            async for _ in async_engine.generate("hi", SamplingParams(max_tokens=0), "bad"):
                pass

        async def consume():
            async for _ in async_engine.generate([5] * 40, SamplingParams(max_tokens=10_000, ignore_eos=True), "s2"):
                pass

        task = asyncio.create_task(consume())
        while async_engine.engine.block_manager.num_free_blocks == async_engine.engine.block_manager.num_blocks:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the engine thread frees the blocks within a step or two
            if async_engine.num_unfinished() == 0:
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(scenario())
        assert_pool_whole(async_engine.engine)
    finally:
        async_engine.shutdown()


def test_chat_applies_the_template(tiny_llama, tokenizer):
    llm = LLM(str(tiny_llama), dtype="float32")
    messages = [{"role": "user", "content": "Hi!"}]
    (out,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert out.prompt_token_ids == list(expected)


def test_dummy_weights_load_from_a_config_alone(tmp_path, tiny_llama):
    import shutil

    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / f, tmp_path / f)
    llm = LLM(str(tmp_path), load_format="dummy", dtype="float32")
    (out,) = llm.generate("abc", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3


@pytest.mark.parametrize("device, flags, expected", [
    ("cpu", {"avx512f", "avx512_bf16"}, torch.bfloat16),  # native bf16: ~1.6x fp32 (benchmarks/BENCHMARKS.md)
    ("cpu", {"avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16),
    ("cpu", {"fp", "asimd", "bf16"}, torch.bfloat16),  # Arm
    ("cpu", {"avx512f", "avx512_vnni"}, torch.float32),  # bf16 emulated: slower than fp32
    ("cpu", set(), torch.float32),
])
def test_auto_dtype_on_cpu_is_bf16_only_where_the_cpu_computes_it(device, flags, expected):
    assert EngineArgs().resolve_dtype(torch.float32, torch.device(device), cpu_flags=flags) == expected
    assert EngineArgs(dtype="float32").resolve_dtype(torch.float32, torch.device(device), cpu_flags=flags) == \
        torch.float32  # an explicit dtype always wins


def test_auto_dtype_engine_follows_this_machines_cpu(tiny_llama):
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    native = any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))
    engine = LLMEngine(EngineArgs(model=str(tiny_llama), max_model_len=64))
    assert engine.dtype == (torch.bfloat16 if native else torch.float32)
    assert next(engine.runner.model.parameters()).dtype == engine.dtype  # it runs in the dtype it reports


def test_warm_up_runs_the_served_shapes_and_writes_no_kv(tiny_llama, caplog):
    from flotilla.engine.model_runner import warm_up_plans

    plans = warm_up_plans(max_num_seqs=32, max_num_batched_tokens=512, max_model_len=128, block_size=16)
    assert max(len(p.input_ids) for p in plans) <= 128  # never past the budget nor the model length
    assert {p.num_decodes for p in plans} >= {1, 4, 16, 32}  # decode batches up to max_num_seqs
    assert any(p.has_context and p.num_decodes for p in plans)  # decodes beside a chunk over cached context
    assert all(set(p.slots) == {-1} for p in plans)
    with caplog.at_level("INFO", logger="flotilla.engine.llm_engine"):
        engine = LLMEngine(EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=128, max_num_seqs=32))
    assert any("warm-up:" in r.getMessage() for r in caplog.records)
    assert engine.runner.kv_cache.count_nonzero() == 0  # the cache is as allocated: no request's KV touched
