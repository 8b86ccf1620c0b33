"""Multi-LoRA throughput: one engine, one workload, the base model alone and then the same requests spread over 1, 4
and 16 adapters in the batch, in one run; each arm's output tokens per second and its ratio to the base arm.

    python benchmarks/lora.py                                   # SmolLM2-135M (bundled), rank 16 on all 7 projections
    python benchmarks/lora.py --model benchmarks/configs/llama-3.1-8b --load-format dummy --tokenizer DIR \\
        --num-seqs 256 --output-len 256                          # on a GPU, Llama-3.1-8B size

The adapters are random PEFT adapters written for the base model (``adapter_config.json`` and
``adapter_model.safetensors``, as PEFT saves them), ``--rank`` on q/k/v/o/gate/up/down of every layer. The engine is
started once with ``--max-loras`` = the most adapters of any arm, so every arm has the same KV cache and slots; the
request order is interleaved (request ``i`` uses adapter ``i mod N``), the worst case for grouping by adapter. An
untimed warm-up pass loads every adapter into its slot first: the arms measure serving, not reading files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path


def write_adapter(folder: Path, config, rank: int, seed: int) -> Path:
    """A PEFT LoRA adapter with random A and B on every projection, in PEFT's file layout."""
    import torch
    from safetensors.torch import save_file

    from flotilla.engine.models.llama import projection_rows

    rows, h = projection_rows(config), config.hidden_size
    shapes = {"self_attn.q_proj": (h, rows["q"]), "self_attn.k_proj": (h, rows["k"]),
              "self_attn.v_proj": (h, rows["v"]), "self_attn.o_proj": (rows["q"], h), "mlp.gate_proj": (h, rows["gate"]), "mlp.up_proj": (h, rows["up"]),
              "mlp.down_proj": (rows["gate"], h)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * fan_in**-0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": [m.split(".")[1] for m in shapes]}))
    return folder


def machine() -> str:
    import torch

    text = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f"; {torch.cuda.get_device_name()}"
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16], help="adapters per arm")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="passes over the arms; each arm's best pass is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    from flotilla.engine import LLM, SamplingParams
    from flotilla.engine.lora import LoRARequest

    most = max(args.adapters)
    llm = LLM(args.model, load_format=args.load_format, tokenizer=args.tokenizer, dtype=args.dtype,
              enable_lora=True, max_loras=most, max_lora_rank=args.rank, max_num_seqs=args.max_num_seqs,
              enable_prefix_caching=False, seed=args.seed)
    engine = llm.llm_engine
    config = engine.model_config
    with tempfile.TemporaryDirectory(prefix="flotilla-lora-bench-") as tmp:
        adapters = [LoRARequest(f"adapter-{i}", i + 1, str(write_adapter(Path(tmp) / f"a{i}", config, args.rank,
                                                                        args.seed + i)))
                    for i in range(most)]
        rng = random.Random(args.seed)
        prompts = [{"prompt_token_ids": [rng.randint(100, config.vocab_size - 1) for _ in range(args.input_len)]}
                   for _ in range(args.num_seqs)]
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        arms = {"base": [None] * args.num_seqs}
        for n in args.adapters:
            arms[f"{n} adapter{'s' if n > 1 else ''}"] = [adapters[i % n] for i in range(args.num_seqs)]
        llm.generate(prompts[:most], SamplingParams(max_tokens=2), use_tqdm=False, lora_request=adapters)  # warm-up
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, loras in arms.items():
                t = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
                elapsed = time.perf_counter() - t
                tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                best[name] = max(best.get(name, 0.0), tokens / elapsed)
        loads = engine.runner.lora.loads
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {machine()}")
    print(f"model: {engine.source.name} ({engine.dtype}, {engine.device}); {args.num_seqs} requests x "
          f"{args.input_len} prompt + {args.output_len} output tokens, max_num_seqs {args.max_num_seqs}; adapters of "
          f"rank {args.rank} on q/k/v/o/gate/up/down; best of {args.repeats} passes; {loads} slot loads in all")
    base = best["base"]
    for name, tok_s in best.items():
        print(f"{name:>12}: {tok_s:8.1f} output tok/s  ({tok_s / base:.2f}x the base model)")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "machine": machine(), "tok_s": best}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
