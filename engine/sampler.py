"""From logits to tokens: logit processors, temperature, top-k / top-p / min-p, seeded sampling, logprobs.

Order follows vLLM: a request's grammar masks the tokens it does not allow (structured_output.py); log-probabilities
are reported from those logits; then the request's own logits processors, allowed_token_ids, bad_words, min_tokens
(EOS and stop ids masked), logit_bias, repetition/presence/frequency penalties, temperature, min-p, top-k, top-p, and
finally sampling. A request with a seed draws from its own generator, one row at a time, so its output does not
depend on what else is in the batch.

Per-row work runs request by request, and an exception there is that request's alone: the row is reported in
``SamplerOutput.failed`` (the engine stops that request) and the rest of the batch samples as usual.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import torch

from flotilla.engine.outputs import Logprob, LogprobDict
from flotilla.engine.request import Request
from flotilla.engine.structured_output import apply_bitmasks

logger = logging.getLogger(__name__)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[LogprobDict | None]  # per row, None when the request asked for none
    failed: dict[int, str] = field(default_factory=dict)  # row -> why its request must stop


def _apply_penalties(row: torch.Tensor, request: Request) -> None:
    p = request.sampling_params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.long, device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and request.output_token_ids:
        out = torch.tensor(request.output_token_ids, dtype=torch.long, device=row.device)
        counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _call_processor(fn, request: Request, row: torch.Tensor) -> torch.Tensor:
    try:
        takes_prompt = len(inspect.signature(fn).parameters) == 3
    except (TypeError, ValueError):  # builtins without a signature take the two-argument form
        takes_prompt = False
    args = (request.prompt_token_ids, request.output_token_ids, row) if takes_prompt else (request.output_token_ids, row)
    out = fn(*args)
    if not isinstance(out, torch.Tensor) or out.shape != row.shape:
        raise TypeError(f"logits processor {getattr(fn, '__name__', fn)!r} must return a tensor of shape "
                        f"{tuple(row.shape)}")
    return out


def _ban_bad_words(row: torch.Tensor, request: Request) -> None:
    """Ban a bad word's last token when the tokens before it were just generated (vLLM's rule)."""
    out = request.output_token_ids
    banned = [ids[-1] for ids in request.sampling_params._bad_words_token_ids
              if len(out) >= len(ids) - 1 and tuple(out[len(out) - len(ids) + 1:]) == ids[:-1]]
    if banned:
        row[torch.tensor(banned, dtype=torch.long, device=row.device)] = float("-inf")


def _process_row(row: torch.Tensor, request: Request) -> None:
    p = request.sampling_params
    for fn in p.logits_processors or ():
        row.copy_(_call_processor(fn, request, row))
    if p.allowed_token_ids:
        keep = torch.tensor(p.allowed_token_ids, dtype=torch.long, device=row.device)
        kept = row[keep]
        row.fill_(float("-inf"))
        row[keep] = kept
    if p._bad_words_token_ids:
        _ban_bad_words(row, request)
    if len(request.output_token_ids) < p.min_tokens:
        banned = set(p.stop_token_ids or []) | (set() if p.ignore_eos else set(p._eos_token_ids))
        if banned:
            row[torch.tensor(sorted(banned), dtype=torch.long, device=row.device)] = float("-inf")
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long, device=row.device)
        vals = torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device)
        row[ids] += vals
    if p.needs_penalties:
        _apply_penalties(row, request)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)
    mask = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    # Drop a token once the mass before it already reaches top_p; the first token always survives.
    mask |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        # On the device the logits live on: a generator must match the tensors it fills.
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """``logits`` ``[len(requests), vocab]``, one row per request that samples this step."""
        logits = logits.float()
        failed: dict[int, str] = {}
        if any(r.grammar is not None for r in requests):
            failed.update(apply_bitmasks(logits, [r.grammar for r in requests]))
            for i in failed:
                logits[i] = 0.0  # keep the batched steps below finite
        want_logprobs = [r.sampling_params.logprobs is not None for r in requests]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        for i, r in enumerate(requests):
            p = r.sampling_params
            if p.needs_row_processing or len(r.output_token_ids) < p.min_tokens:
                try:
                    _process_row(logits[i], r)
                except Exception as e:  # this request's own processing: fail it, not the batch
                    failed[i] = _describe(e)
                    logger.exception("request %s: logits processing failed", r.request_id)
                    logits[i] = 0.0  # keep the batched steps below finite

        params = [r.sampling_params for r in requests]
        tokens = logits.argmax(dim=-1)
        if not all(p.greedy for p in params):
            tokens = self._sample(logits, requests, tokens)
        token_list = tokens.tolist()
        logprobs: list[LogprobDict | None] = []
        for i, r in enumerate(requests):
            if raw_logprobs is None or not want_logprobs[i] or i in failed:
                logprobs.append(None)
                continue
            try:
                logprobs.append(top_logprobs(raw_logprobs[i], token_list[i], r.sampling_params.logprobs or 0))
            except Exception as e:
                failed[i] = _describe(e)
                logger.exception("request %s: logprobs failed", r.request_id)
                logprobs.append(None)
        return SamplerOutput(token_list, logprobs, failed)

    def _sample(self, logits: torch.Tensor, requests: list[Request], greedy_tokens: torch.Tensor) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        device = logits.device
        greedy = torch.tensor([p.greedy for p in params], device=device)
        temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)
        logits = logits / temperature[:, None]
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)
            probs = logits.softmax(dim=-1)
            threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            vocab = logits.shape[-1]
            top_k = torch.tensor([min(p.top_k, vocab) for p in params], device=device)  # huge k means all
            top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=-1)
        # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p, one generator per row.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, r in enumerate(requests):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, greedy_tokens, sampled)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def top_logprobs(logprobs: torch.Tensor, token_id: int, num: int) -> LogprobDict:
    """The chosen token's log-probability and rank plus the ``num`` most likely tokens."""
    chosen = float(logprobs[token_id])
    rank = int((logprobs > chosen).sum()) + 1
    result: LogprobDict = {token_id: Logprob(chosen, rank)}
    if num > 0:
        values, ids = logprobs.topk(min(num, logprobs.shape[-1]))
        for r, (v, t) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            if t not in result:
                result[t] = Logprob(v, r)
    return result
