"""One sequence's state as it moves through the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from flotilla.engine.lora.request import LoRARequest
from flotilla.engine.outputs import LogprobDict, RequestMetrics
from flotilla.engine.pooling import PoolingState
from flotilla.engine.sampling_params import SamplingParams
from flotilla.engine.structured_output import GrammarState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # processing this request raised; it alone was stopped

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.SWAPPED)


@dataclass(eq=False)
class Request:
    """A single sequence (one of a parent request's ``n`` samples). The scheduler moves it between
    queues, the block manager owns ``block_ids``, the model runner reads its tokens, the engine appends
    outputs. ``num_computed_tokens`` counts tokens whose K/V are in the cache."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    metrics: RequestMetrics
    max_model_len: int
    cache_salt: str | None = None
    parent_id: str | None = None
    index: int = 0  # position among the parent's n samples
    generator: torch.Generator | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    cpu_block_ids: list[int] = field(default_factory=list)  # where its K/V wait while swapped out
    block_hashes: list[bytes] = field(default_factory=list)  # of its full, cached blocks, in order
    cumulative_logprob: float = 0.0
    logprobs: list[LogprobDict] | None = None
    prompt_logprobs: list[LogprobDict | None] | None = None
    stop_reason: int | str | None = None
    grammar: GrammarState | None = None  # where its output stands in its grammar (guided decoding), if it has one
    pooling: PoolingState | None = None  # an embedding request's: its prompt is pooled, not continued
    lora_request: LoRARequest | None = None  # the adapter it runs with (None: the base model)
    lora_folder: str | None = None  # that adapter's local folder, resolved when it was registered

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        if self.sampling_params.logprobs is not None:
            self.logprobs = []

    @property
    def lora_id(self) -> int:
        """Its adapter's id, 0 for the base model."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def prefix_salt(self) -> str | None:
        """What sets its prefix-cache entries apart besides its tokens: the cache salt and the adapter (the same
        prompt under two adapters has different K/V)."""
        if self.lora_request is None:
            return self.cache_salt
        return f"lora:{self.lora_request.lora_int_id}:{self.cache_salt or ''}"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """Prompt plus the most output this request may produce, capped by max_model_len."""
        max_tokens = self.sampling_params.max_tokens
        limit = self.max_model_len if max_tokens is None else self.num_prompt_tokens + max_tokens
        return min(limit, self.max_model_len)

    @property
    def schedulable(self) -> bool:
        """False while its grammar is still compiling: the scheduler admits the requests behind it meanwhile."""
        return self.grammar is None or self.grammar.ready

    def append_token(self, token_id: int) -> None:
        """Add a sampled token; the grammar, if any, advances with it (``ValueError`` when it does not allow it)."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)
