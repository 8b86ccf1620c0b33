"""bf16 on a GPU: how often Flotilla's greedy token is transformers' bf16 top-1 at the same position (issue 12).

fp32 is tested token for token (the suite's exactness tests run on CUDA as they are). bf16 cannot be: two correct
implementations round differently and part ways at the first near-tie. So this reports top-1 agreement with teacher
forcing: Flotilla generates greedily in bf16; transformers (bf16, and fp32 as the scale of bf16's own noise) reads
each whole sequence once, and its argmax at every generated position is compared with Flotilla's token there.

    python benchmarks/gpu_agreement.py --tokenizer TOKENIZER_DIR [--json out.json]

The models are the suite's tiny random families (tests/conftest.py TINY_VARIANTS), built from transformers' configs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def teacher_forced_top1(model, sequences: list[list[int]], prompt_lens: list[int]) -> list[list[int]]:
    """transformers' argmax after each prefix, at the positions that predict the generated tokens."""
    out = []
    with torch.no_grad():
        for seq, n in zip(sequences, prompt_lens):
            logits = model(torch.tensor([seq], device=model.device)).logits[0]
            out.append(logits[n - 1:len(seq) - 1].argmax(-1).tolist())
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import TINY_VARIANTS, build_tiny
    from flotilla.engine import LLM, SamplingParams

    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rng = random.Random(0)
    results = {}
    for variant in sorted(TINY_VARIANTS):
        folder = build_tiny(variant, Path(tempfile.mkdtemp(prefix=f"agree-{variant}-")), tok)
        llm = LLM(str(folder), dtype="bfloat16", enable_prefix_caching=False, gpu_memory_utilization=0.3)
        vocab = llm.llm_engine.model_config.vocab_size
        prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(5, 60))] for _ in range(args.prompts)]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": q} for q in prompts], params, use_tqdm=False)
        ours = [o.outputs[0].token_ids for o in outs]
        del llm
        torch.cuda.empty_cache()
        seqs = [q + o for q, o in zip(prompts, ours)]
        lens = [len(q) for q in prompts]
        hf = {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to("cuda").eval()
            hf[name] = teacher_forced_top1(model, seqs, lens)
        results[variant] = dict(
            flotilla_bf16_vs_hf_bf16=agreement(ours, hf["bf16"]),
            flotilla_bf16_vs_hf_fp32=agreement(ours, hf["fp32"]),
            hf_bf16_vs_hf_fp32=agreement(hf["bf16"], hf["fp32"]),
            positions=sum(map(len, ours)))
    print(f"\n{'family':>8} {'positions':>9} {'ours~hf bf16':>12} {'ours~hf fp32':>12} {'hf bf16~fp32':>12}")
    for v, r in results.items():
        print(f"{v:>8} {r['positions']:>9} {r['flotilla_bf16_vs_hf_bf16']:>12.4f} {r['flotilla_bf16_vs_hf_fp32']:>12.4f} "
              f"{r['hf_bf16_vs_hf_fp32']:>12.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=sys.argv, device=torch.cuda.get_device_name(), results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
