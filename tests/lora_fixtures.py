"""PEFT LoRA adapters for the tests, and their oracle: transformers' greedy output with the adapter merged."""

from __future__ import annotations

from pathlib import Path

import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapter(base: Path, folder: Path, seed: int, targets=ALL, rank: int = 8, alpha: float = 16,
                  **config) -> Path:
    """A PEFT LoRA adapter of ``base`` with random A and B (PEFT's default B is zero: no effect to test)."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                            init_lora_weights=False, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    peft_model.save_pretrained(folder)
    return folder


def peft_greedy(base: Path, adapter: Path, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy output with the adapter merged into a fresh copy of the base weights."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    with torch.no_grad():
        out = merged.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
