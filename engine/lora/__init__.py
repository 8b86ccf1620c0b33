"""Multi-LoRA serving: many PEFT adapters on one base model, batched together (see each module's doc)."""

from flotilla.engine.lora.request import LoRARequest

__all__ = ["LoRARequest"]
