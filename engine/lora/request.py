"""``LoRARequest``: which adapter a request runs with, as vLLM names it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """``lora_name`` is what clients send as ``model``; ``lora_int_id`` (>= 1) names this adapter in the engine: its
    device slot, its host copy and its prefix-cache entries (an adapter loaded again under the same name gets a new
    id, so nothing computed with the old weights is reused); ``lora_path``: a local folder, a Hugging Face repo id
    (``ORG/NAME[@REV]``) or ``s3://BUCKET/PREFIX`` holding a PEFT adapter (``adapter_config.json`` and
    ``adapter_model.safetensors``)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id: must be an integer >= 1, got {self.lora_int_id!r}")
        if not self.lora_name:
            raise ValueError("lora_name: must not be empty")
        if not self.lora_path:
            raise ValueError(f"lora_path: adapter {self.lora_name!r} names no path")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
