"""Sampling parameters with vLLM's field names, validated at construction."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from flotilla.engine.structured_output import GuidedDecodingParams

# A per-request logits processor, as vLLM's offline API takes them: ``fn(output_token_ids, logits)`` or
# ``fn(prompt_token_ids, output_token_ids, logits)``, returning the (possibly modified) 1-D logits row.
LogitsProcessor = Callable[..., torch.Tensor]

# torch.Generator.manual_seed takes 64-bit seeds; vLLM's API bounds them to a signed 64-bit integer.
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1
# vLLM clamps logit_bias values to OpenAI's documented range rather than refusing them.
_LOGIT_BIAS_LIMIT = 100.0


class RequestOutputKind(enum.IntEnum):
    """Which ``RequestOutput`` s a request yields, as vLLM names them: after every step that advanced it, with all
    its tokens so far (``CUMULATIVE``), or once, when it finishes (``FINAL_ONLY``: ``LLM.generate``'s, which needs
    no more and spares the engine building an output per request per step). vLLM's ``DELTA`` is not served."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """How to sample one request's output tokens. Field names and defaults follow vLLM's ``SamplingParams``.

    Construction validates every field and raises ``ValueError`` naming the offending one; unknown keyword
    arguments are rejected the same way rather than silently ignored.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None  # sample only among these ids
    bad_words: list[str] | None = None  # never generate these words (checked token by token, as vLLM does)
    logits_processors: list[LogitsProcessor] | None = None  # offline API only; never from HTTP
    guided_decoding: GuidedDecodingParams | None = None  # the output must match a grammar (structured_output.py)
    structured_outputs: GuidedDecodingParams | None = None  # vLLM's newer name for guided_decoding
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Set by the engine at admission from the tokenizer; not part of a user's request.
    _eos_token_ids: frozenset[int] = field(default=frozenset(), repr=False)
    _bad_words_token_ids: tuple[tuple[int, ...], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            if any(not math.isfinite(v) for v in self.logit_bias.values()):
                raise ValueError("logit_bias: values must be finite numbers")
            self.logit_bias = {k: max(-_LOGIT_BIAS_LIMIT, min(_LOGIT_BIAS_LIMIT, v)) for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = [int(t) for t in self.allowed_token_ids]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if self.top_k == -1:
            self.top_k = 0
        if self.structured_outputs is not None:
            if self.guided_decoding is not None and self.guided_decoding != self.structured_outputs:
                raise ValueError("structured_outputs: give guided_decoding or structured_outputs, not both")
            self.guided_decoding = self.structured_outputs
        self.structured_outputs = self.guided_decoding
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        # NaN slips through every range comparison below, so finiteness comes first.
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if self.seed is not None and not _SEED_MIN <= self.seed <= _SEED_MAX:
            raise bad("seed", "must fit in a signed 64-bit integer")
        if self.temperature < 0.0:
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "must be -1 (disable), 0 (disable) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty", "must be > 0")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.logprobs is not None and self.logprobs < 0:
            raise bad("logprobs", "must be >= 0")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise bad("prompt_logprobs", "must be >= 0")
        if any(not s for s in self.stop):
            raise bad("stop", "must not contain empty strings")
        if self.stop and not self.detokenize:
            raise bad("stop", "stop strings need detokenize=True")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise bad("allowed_token_ids", "must not be empty")
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise bad("bad_words", "must be non-empty strings")
        if self.logits_processors is not None and any(not callable(f) for f in self.logits_processors):
            raise bad("logits_processors", "must be callables")
        if self.guided_decoding is not None and not isinstance(self.guided_decoding, GuidedDecodingParams):
            raise bad("guided_decoding", "must be a GuidedDecodingParams")
        if self.output_kind not in (RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY):
            raise bad("output_kind", "must be RequestOutputKind.CUMULATIVE or FINAL_ONLY (DELTA is not served)")
        self.output_kind = RequestOutputKind(self.output_kind)

    def check_token_ids(self, vocab_size: int) -> None:
        """Every token id this request carries must index a logits row of ``vocab_size``; an id outside
        would fail (or worse, wrap around) in the middle of a batch, so it is refused at admission."""
        fields: list[tuple[str, list[int]]] = [
            ("logit_bias", list(self.logit_bias or ())),
            ("stop_token_ids", list(self.stop_token_ids or ())),
            ("allowed_token_ids", list(self.allowed_token_ids or ())),
            ("bad_words", [t for ids in self._bad_words_token_ids for t in ids]),
        ]
        for name, ids in fields:
            wrong = [t for t in ids if not 0 <= t < vocab_size]
            if wrong:
                raise ValueError(f"{name}: token ids must be in [0, {vocab_size}), got {wrong[0]}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_row_processing(self) -> bool:
        """Whether the sampler must touch this request's logits row before the batched steps
        (min_tokens is checked per step, since it depends on how many tokens are out)."""
        return bool(self.logit_bias or self.needs_penalties or self.allowed_token_ids or self._bad_words_token_ids
                    or self.logits_processors)

    def bind(self, eos_token_ids: frozenset[int], bad_words_token_ids: list[list[int]] | None = None
             ) -> "SamplingParams":
        """A copy carrying what the engine derives from its tokenizer at admission."""
        return dataclasses.replace(self, _eos_token_ids=frozenset(eos_token_ids),
                                   _bad_words_token_ids=tuple(tuple(ids) for ids in bad_words_token_ids or ()))

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}


_dataclass_init = SamplingParams.__init__


def _checked_init(self: SamplingParams, *args: Any, **kwargs: Any) -> None:
    # Reject unknown fields with ValueError (a dataclass raises TypeError) so API layers map it to HTTP 400.
    unknown = sorted(set(kwargs) - SamplingParams.field_names() - {"_eos_token_ids", "_bad_words_token_ids"})
    if unknown:
        raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
    _dataclass_init(self, *args, **kwargs)


SamplingParams.__init__ = _checked_init  # type: ignore[method-assign]
