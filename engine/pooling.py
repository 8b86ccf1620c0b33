"""Embeddings: which runner a model gets, how its hidden states are pooled into one vector per prompt, and the
per-request pooling state that survives chunked prefill.

A model served by the pooling runner (vLLM's ``--runner pooling``, formerly ``--task embed``) computes each prompt
once and returns, instead of tokens, its final hidden states pooled one way:

- ``LAST``: the last token's (decoder embedding models: Qwen3-Embedding, e5-mistral, gte-Qwen2);
- ``MEAN``: the mean over the prompt's tokens;
- ``CLS``: the first token's;

then L2-normalised unless told otherwise. The method and the normalisation come from the model's
sentence-transformers files when it has them (``modules.json`` naming a ``Pooling`` module, whose ``config.json``
says which mode, and a ``Normalize`` module), else LAST and normalised, as vLLM defaults for decoder models;
``--pooler-config`` overrides them. ``dimensions`` (OpenAI's, for Matryoshka models) keeps the first N components
before normalising.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flotilla.engine.config import json_option

POOLING_TYPES = ("LAST", "MEAN", "CLS")
RUNNERS = ("auto", "generate", "pooling")
# vLLM's older --task values and the runner each means
_TASKS = {"auto": "auto", "generate": "generate", "embed": "pooling", "embedding": "pooling"}
# sentence-transformers' Pooling config flag -> our pooling type
_ST_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS"}


@dataclass(frozen=True)
class PoolingParams:
    """Per request, as vLLM's ``PoolingParams``: ``dimensions`` keeps the first N components (Matryoshka models
    only); ``normalize`` overrides the model's normalisation."""

    dimensions: int | None = None
    normalize: bool | None = None


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: str = "LAST"
    normalize: bool = True


def resolve_runner(runner: str, task: str, architecture: str) -> str:
    """``generate`` or ``pooling``. ``task`` is vLLM's older spelling (``embed`` means pooling); ``auto`` gives a
    bare encoder (an architecture ending in ``Model``: no LM head, such as ``MistralModel``) the pooling runner."""
    if runner not in RUNNERS:
        raise ValueError(f"runner: must be one of {RUNNERS}, got {runner!r}")
    if task not in _TASKS:
        raise ValueError(f"task: must be one of {tuple(_TASKS)}, got {task!r}")
    chosen = runner if runner != "auto" else _TASKS[task]
    if runner != "auto" and _TASKS[task] not in ("auto", runner):
        raise ValueError(f"task {task!r} contradicts runner {runner!r}")
    if chosen == "auto":
        chosen = "pooling" if architecture.endswith("Model") else "generate"
    if chosen == "generate" and architecture.endswith("Model"):
        raise ValueError(f"architecture {architecture} has no language-model head: it serves embeddings only "
                         "(--runner pooling)")
    return chosen


def pooler_config(folder: Path, override: dict[str, Any] | str | None = None) -> PoolerConfig:
    """The model's pooling: its sentence-transformers files, else LAST + normalise; ``override`` (a dict or its JSON,
    ``{"pooling_type": "MEAN", "normalize": false}``) wins field by field."""
    pooling, normalize = "LAST", True
    modules_file = folder / "modules.json"
    if modules_file.exists():
        modules = json.loads(modules_file.read_text())
        kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
        normalize = "Normalize" in kinds
        if "Pooling" in kinds:
            pooling_file = folder / kinds["Pooling"].get("path", "") / "config.json"
            if pooling_file.exists():
                settings = json.loads(pooling_file.read_text())
                chosen = [kind for flag, kind in _ST_MODES.items() if settings.get(flag)]
                if len(chosen) != 1:
                    raise ValueError(f"{pooling_file}: one pooling mode of {sorted(_ST_MODES)} must be set (this "
                                     "engine pools one way), found {chosen or 'none'}")
                pooling = chosen[0]
    override = json_option("pooler_config", override, {"pooling_type", "normalize"})
    pooling = str(override.get("pooling_type", pooling)).upper()
    if pooling not in POOLING_TYPES:
        raise ValueError(f"pooler_config: pooling_type must be one of {POOLING_TYPES}, got {pooling!r}")
    return PoolerConfig(pooling, bool(override.get("normalize", normalize)))


def check_dimensions(dimensions: int | None, config: Any) -> None:
    """``dimensions`` is allowed only for a Matryoshka model (its config says ``is_matryoshka``, or lists
    ``matryoshka_dimensions``), and must be one it lists, or 1..hidden_size."""
    if dimensions is None:
        return
    allowed = getattr(config, "matryoshka_dimensions", None)
    if not (getattr(config, "is_matryoshka", False) or allowed):
        raise ValueError("dimensions: this model does not support Matryoshka representations; changing the output "
                         "dimensions would give poor embeddings")
    if allowed and dimensions not in allowed:
        raise ValueError(f"dimensions: must be one of {sorted(allowed)}, got {dimensions}")
    if not 1 <= dimensions <= config.hidden_size:
        raise ValueError(f"dimensions: must be in [1, {config.hidden_size}], got {dimensions}")


def chunk_partial(rows: torch.Tensor, pooling_type: str, starts_prompt: bool) -> torch.Tensor | None:
    """What one prefill chunk's final hidden states ``[rows, hidden]`` contribute, in fp32: its last row (LAST), its
    first row when the chunk starts the prompt (CLS), the sum of its rows (MEAN)."""
    if pooling_type == "LAST":
        return rows[-1].float()
    if pooling_type == "CLS":
        return rows[0].float() if starts_prompt else None
    return rows.float().sum(dim=0)


@dataclass
class PoolingState:
    """One request's pooling across the chunks of its prompt. A chunk that starts the prompt resets it (the prompt
    is being computed again after a preemption)."""

    config: PoolerConfig
    params: PoolingParams
    value: torch.Tensor | None = None
    rows: int = 0
    embedding: list[float] | None = field(default=None, repr=False)

    def add(self, partial: torch.Tensor | None, rows: int, starts_prompt: bool) -> None:
        if starts_prompt:
            self.value, self.rows = None, 0
        self.rows += rows
        if partial is None:
            return
        if self.config.pooling_type == "MEAN" and self.value is not None:
            self.value = self.value + partial
        else:
            self.value = partial

    def finish(self) -> list[float]:
        """The embedding, once the prompt's last chunk is in."""
        assert self.value is not None, "pooling finished before the prompt was computed"
        v = self.value / self.rows if self.config.pooling_type == "MEAN" else self.value
        if self.params.dimensions is not None:
            v = v[:self.params.dimensions]
        normalize = self.config.normalize if self.params.normalize is None else self.params.normalize
        if normalize:
            v = F.normalize(v, p=2, dim=-1)
        self.embedding = v.cpu().tolist()
        return self.embedding
