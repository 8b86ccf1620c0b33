"""Tensor-parallel layers (Megatron-style: column-parallel qkv and gate_up, row-parallel o_proj and down_proj with one
all-reduce each, vocabulary-parallel embedding and LM head, KV heads replicated when ranks outnumber them): the
model split over 2, 3 or 4 gloo processes decodes greedily token for token as one process does and as
transformers' generate() does, fp32 on CPU."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import torch

import tp_harness
from conftest import assert_pool_whole, hf_greedy, hf_model

PROMPT = [5, 17, 42, 7, 99, 3, 11, 64, 23]
STEPS = 10


def eos_ids(folder) -> list[int]:
    eos = hf_model(folder).generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def check(folder, size: int, tmp_path, steps: int = STEPS) -> None:
    masked = eos_ids(folder)
    expected = hf_greedy(folder, PROMPT, steps)
    single, logits = tp_harness.greedy(str(folder), PROMPT, steps, masked)
    assert single == expected  # the harness with one rank is the engine's own forward
    ranks = tp_harness.run(size, str(folder), PROMPT, steps, masked, tmp_path / "out")
    for rank, result in enumerate(ranks):
        assert result["tokens"] == expected, f"rank {rank} of {size}"
        torch.testing.assert_close(torch.tensor(result["logits"]), torch.tensor(logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [2, 4])  # 4 ranks > 2 KV heads (llama) : replicated KV heads
def test_tiny_models_split_over_ranks_decode_as_one_process(tiny_model, size, tmp_path):
    check(tiny_model, size, tmp_path)


def test_smollm2_over_three_ranks(smollm2_dir, tmp_path):
    # 9 query heads and 3 KV heads: three ranks of 3 + 1; a vocabulary of 49152 split in three
    check(smollm2_dir, 3, tmp_path, steps=6)


# --- the engine over several ranks: workers started, fed one plan per step, supervised -------------------

def _prompts(n: int, vocab: int, seed: int, shared: int = 24) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared)]  # half of them share a prefix: the cache is hit
    return [(prefix if i % 2 else []) + [rng.randrange(3, vocab) for _ in range(rng.randint(5, 30))] for i in range(n)]


def _greedy(n: int):
    from flotilla.engine import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)


def test_the_engine_over_two_ranks_is_exact_under_preemption_chunking_and_prefix_caching(tiny_model):
    from flotilla.engine import LLM

    # 12 blocks x 16 tokens for six requests of up to ~70 tokens: preemption; 32-token steps: chunked prefill
    llm = LLM(str(tiny_model), dtype="float32", tensor_parallel_size=2, num_gpu_blocks_override=12,
              max_model_len=160, max_num_batched_tokens=32, enable_prefix_caching=True)
    engine = llm.llm_engine
    processes = list(engine.workers.processes)
    try:
        prompts = _prompts(6, engine.model_config.vocab_size, seed=3)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(16), use_tqdm=False)
        assert engine.scheduler.num_preemptions > 0
        for prompt, out in zip(prompts, outs):
            assert out.outputs[0].token_ids == hf_greedy(tiny_model, prompt, 16)
        assert_pool_whole(engine)
    finally:
        llm.llm_engine.shutdown()
    assert processes and not any(p.is_alive() for p in processes)  # shutdown stopped every rank


def test_smollm2_served_over_three_ranks_matches_transformers(smollm2_dir):
    from flotilla.engine import LLM

    llm = LLM(str(smollm2_dir), dtype="float32", tensor_parallel_size=3, num_gpu_blocks_override=32)
    try:
        prompts = _prompts(3, llm.llm_engine.model_config.vocab_size, seed=4, shared=8)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(6), use_tqdm=False)
        for prompt, out in zip(prompts, outs):
            assert out.outputs[0].token_ids == hf_greedy(smollm2_dir, prompt, 6)
        assert_pool_whole(llm.llm_engine)
    finally:
        llm.llm_engine.shutdown()


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` and that are multiprocessing spawn children (not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_server_on_two_ranks_answers_the_openai_sdk_and_exits_when_a_worker_dies(tiny_llama):
    import openai

    from flotilla.engine import LLM
    from server_process import ServerProcess

    expected = LLM(str(tiny_llama), dtype="float32").generate(
        {"prompt_token_ids": [5, 6, 7, 8]}, _greedy(8), use_tqdm=False)[0].outputs[0].text
    server = ServerProcess([str(tiny_llama), "--tensor-parallel-size", "2", "--dtype", "float32",
                            "--served-model-name", "tiny"]).wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=8, temperature=0,
                                          extra_body={"min_tokens": 8})
        assert reply.choices[0].text == expected
        [worker] = _children(server.proc.pid)
        os.kill(worker, signal.SIGKILL)
        assert server.proc.wait(timeout=60) == 1  # detected while idle: /health fails and the server exits
    finally:
        server.stop()
    assert not _alive(worker)


def test_sigterm_drains_and_every_rank_exits(tiny_llama):
    from server_process import ServerProcess

    server = ServerProcess([str(tiny_llama), "--tensor-parallel-size", "2", "--dtype", "float32"]).wait_ready()
    try:
        [worker] = _children(server.proc.pid)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    assert not _alive(worker)
