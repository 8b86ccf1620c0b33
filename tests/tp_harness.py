"""Runs one model across tensor-parallel ranks the way the engine's step does (paged KV cache, fresh prefill, then
batched decode through the attention backend), greedily, in `size` processes joined by gloo. The test's oracles
are the same harness with one rank and transformers' generate()."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.multiprocessing as mp

BLOCK = 4


def greedy(folder: str, prompt: list[int], steps: int, masked: list[int]) -> tuple[list[int], list[list[float]]]:
    """Greedy tokens (``masked`` ids never chosen, as min_new_tokens does for EOS) and the first step's logits."""
    from flotilla.engine.attention import AttentionMetadata, forward_context
    from flotilla.engine.model_loader import load_config, load_model, resolve_model
    from flotilla.engine.model_runner import ModelRunner

    source = resolve_model(folder)
    config = load_config(source)
    cpu = torch.device("cpu")
    model = load_model(source, config, torch.float32, cpu)
    runner = ModelRunner(model, config, cpu, torch.float32, BLOCK)
    total = len(prompt) + steps
    runner.allocate_kv_cache(-(-total // BLOCK))
    table = torch.arange(runner.num_blocks, dtype=torch.int32).reshape(1, -1)
    empty = torch.zeros(0, table.shape[1], dtype=torch.int32)

    def pick(logits: torch.Tensor) -> int:
        logits = logits.clone()
        logits[masked] = float("-inf")
        return int(logits.argmax())

    n = len(prompt)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), num_decode_tokens=0, decode_block_tables=empty,
        decode_seq_lens=torch.zeros(0, dtype=torch.int32), prefill_block_tables=table,
        prefill_seq_lens=torch.tensor([n], dtype=torch.int32),
        prefill_query_start_loc=torch.tensor([0, n], dtype=torch.int32), prefill_has_context=False)
    with torch.inference_mode():
        with forward_context(meta):
            logits = model.compute_logits(model(torch.tensor(prompt), torch.arange(n))[-1:])[0]
        first = logits.tolist()
        tokens = [pick(logits)]
        for pos in range(n, total - 1):
            meta = AttentionMetadata(
                slot_mapping=torch.tensor([pos]), num_decode_tokens=1, decode_block_tables=table,
                decode_seq_lens=torch.tensor([pos + 1], dtype=torch.int32),
                prefill_block_tables=empty, prefill_seq_lens=torch.zeros(0, dtype=torch.int32),
                prefill_query_start_loc=torch.zeros(1, dtype=torch.int32), prefill_has_context=False)
            with forward_context(meta):
                logits = model.compute_logits(model(torch.tensor([tokens[-1]]), torch.tensor([pos])))[0]
            tokens.append(pick(logits))
    return tokens, [first]


def _rank(rank: int, size: int, rendezvous: str, folder: str, prompt: list[int], steps: int, masked: list[int],
          out: str) -> None:
    from flotilla.engine.parallel import destroy_tensor_parallel, init_tensor_parallel

    torch.set_num_threads(1)
    init_tensor_parallel(rank, size, rendezvous, "gloo")
    try:
        tokens, logits = greedy(folder, prompt, steps, masked)
        Path(f"{out}.{rank}").write_text(json.dumps({"tokens": tokens, "logits": logits}))
    finally:
        destroy_tensor_parallel()


def run(size: int, folder: str, prompt: list[int], steps: int, masked: list[int], out: Path) -> list[dict]:
    """Every rank's result (each rank computes the whole vocabulary's logits and samples the same token). The ranks
    meet through a file beside `out` (no port to pick, so none to lose to another process)."""
    rendezvous = f"file://{out.parent / (out.name + '.rendezvous')}"
    mp.start_processes(_rank, args=(size, rendezvous, folder, prompt, steps, masked, str(out)), nprocs=size,
                       start_method="spawn")
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(size)]
