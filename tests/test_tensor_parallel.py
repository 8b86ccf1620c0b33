"""Tensor-parallel layers (Megatron-style: column-parallel qkv and gate_up, row-parallel o_proj and down_proj with one
all-reduce each, vocabulary-parallel embedding and LM head, KV heads replicated when ranks outnumber them): the
model split over 2, 3 or 4 gloo processes decodes greedily token for token as one process does and as
transformers' generate() does, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

import tp_harness
from conftest import hf_greedy, hf_model

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
