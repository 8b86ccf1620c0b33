"""Structured output: grammars that constrain which tokens a request may sample (vLLM's guided decoding).

One way through, on xgrammar:

1. ``GuidedDecodingParams`` (vLLM's names; ``StructuredOutputsParams`` is the newer spelling) says what the output
   must be: a JSON schema, any JSON object, a regex, one of a list of choices, or an EBNF grammar.
2. At admission ``StructuredOutputs.prepare`` parses it into an xgrammar ``Grammar``. That is quick, and an invalid
   schema, regex or grammar is a ``ValueError`` naming the request field it came from (HTTP 400).
3. Compiling the grammar against the tokenizer (the slow part: a token-mask cache over the whole vocabulary) runs on
   a thread pool, off the step loop, once per distinct grammar (an LRU of compiled grammars). The scheduler leaves a
   request whose grammar is still compiling in the queue and admits the requests behind it.
4. Each sequence (each of ``n``) holds its own ``GrammarMatcher``. Before sampling, the sampler asks the batch's
   matchers for their allowed tokens (a bitmask, ``apply_bitmasks``) and masks the rest to -inf; the engine advances
   the matcher with every token it appends. A preempted request keeps its output tokens (recompute re-runs them as
   prompt), so its matcher stays where it was: there is nothing to roll back.

xgrammar is imported only when the first request with a grammar arrives.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# Free whitespace between JSON tokens is capped at this many characters per gap. Small models under a free-whitespace
# JSON grammar can emit newlines forever (the output never closes before max_tokens); a cap keeps every indentation
# style a model uses and ends such loops. disable_any_whitespace removes free whitespace altogether.
MAX_JSON_WHITESPACE = 64
_BACKENDS = (None, "auto", "xgrammar")
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


@dataclass
class GuidedDecodingParams:
    """What a request's output must match; exactly one of ``json``, ``regex``, ``choice``, ``grammar`` and
    ``json_object`` is set. Field names follow vLLM's ``GuidedDecodingParams`` / ``StructuredOutputsParams``."""

    json: str | dict | None = None  # a JSON schema (a dict, or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF-style, as xgrammar and llama.cpp read it)
    json_object: bool | None = None  # any JSON object
    backend: str | None = None  # only xgrammar here; "auto" picks it
    whitespace_pattern: str | None = None  # not supported by the xgrammar backend (vLLM refuses it there too)
    disable_any_whitespace: bool = False  # JSON without free whitespace between tokens
    disable_additional_properties: bool = False  # objects without a schema's additionalProperties: refused
    disable_fallback: bool = False  # accepted for compatibility: there is one backend, nothing to fall back to
    # The request field the grammar came from, for error messages ("guided_json", "response_format", ...).
    _origin: str = field(default="guided_decoding", repr=False, compare=False)

    def __post_init__(self) -> None:
        set_kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(f"{self._origin}: exactly one of {', '.join(_KINDS)} must be set, got "
                             f"{', '.join(set_kinds) or 'none'}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"{self._origin}: backend {self.backend!r} is not available; this engine guides "
                             "decoding with xgrammar ('xgrammar' or 'auto')")
        if self.whitespace_pattern is not None:
            raise ValueError(f"{self._origin}: whitespace_pattern is not supported by the xgrammar backend; use "
                             "disable_any_whitespace")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"{self._origin}: choice must be a non-empty list of strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{self._origin}: {name} must be a non-empty string")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple:
        """What identifies the compiled grammar: two requests with equal keys share one compilation."""
        spec = getattr(self, self.kind)
        if isinstance(spec, dict):
            spec = json.dumps(spec, sort_keys=True)
        elif isinstance(spec, list):
            spec = tuple(spec)
        return (self.kind, spec, self.disable_any_whitespace, self.disable_additional_properties)


StructuredOutputsParams = GuidedDecodingParams  # vLLM's newer name for the same thing


def _schema_text(schema: str | dict, disable_additional_properties: bool, origin: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"{origin}: the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{origin}: a JSON schema must be an object, got {type(schema).__name__}")
    if disable_additional_properties:
        schema = _closed(schema)
    return json.dumps(schema)


def _closed(node: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that does not say otherwise."""
    if isinstance(node, list):
        return [_closed(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed(v) for k, v in node.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def _choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of ``choices`` (each a JSON string literal, which EBNF reads the same)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def parse(params: GuidedDecodingParams) -> Any:
    """The xgrammar ``Grammar`` for ``params``; ``ValueError`` naming the request field when it is invalid."""
    import xgrammar as xgr

    origin, kind = params._origin, params.kind
    try:
        if kind in ("json", "json_object"):
            # json_object: any object (what OpenAI's json_object promises; xgrammar's builtin JSON grammar would
            # also take a bare string or number), with whatever properties.
            schema = (_schema_text(params.json, params.disable_additional_properties, origin)  # type: ignore[arg-type]
                      if kind == "json" else '{"type": "object"}')
            return xgr.Grammar.from_json_schema(schema, any_whitespace=not params.disable_any_whitespace,
                                                strict_mode=kind == "json", max_whitespace_cnt=MAX_JSON_WHITESPACE)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)  # type: ignore[arg-type]
        if kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(params.choice))  # type: ignore[arg-type]
        return xgr.Grammar.from_ebnf(params.grammar)  # type: ignore[arg-type]
    except ValueError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError (and its own types) for what it cannot read
        what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar", "choice": "choice"}.get(kind, kind)
        lines = str(e).strip().splitlines()
        # xgrammar's C++ messages start with a timestamp and a source location; the user needs neither.
        detail = _CPP_PREFIX.sub("", lines[0]) if lines else type(e).__name__
        raise ValueError(f"{origin}: invalid {what}: {detail}") from None


class GrammarState:
    """One sequence's place in its grammar: the compilation it waits for, then its own matcher."""

    def __init__(self, compiled: Future) -> None:
        self._compiled = compiled
        self._matcher: Any = None

    @property
    def compilation(self) -> Future:
        return self._compiled

    @property
    def ready(self) -> bool:
        """Whether the compilation has finished (successfully or not): the request may be scheduled."""
        return self._compiled.done()

    @property
    def matcher(self) -> Any:
        """The matcher; raises the compilation's error when it failed (the request alone then fails)."""
        if self._matcher is None:
            import xgrammar as xgr

            self._matcher = xgr.GrammarMatcher(self._compiled.result())
        return self._matcher

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise ValueError(f"the grammar rejected token {token_id}")

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may follow."""
        return self._matcher is not None and self._matcher.is_terminated()


# How far compiling yields to the step loop: a Linux nice value, set per thread (xgrammar's threads inherit it).
# benchmarks/structured_output.py: a 400-field schema compiling beside 8 streams made their largest inter-token gap
# 587 ms at nice 0 and 134 ms at 19 (129-148 ms without it); that one request's first token came 7.3 s after it
# arrived instead of 3.3 s. Running streams keep their pace; a new large schema waits longer, once (then cached).
COMPILE_NICENESS = 19


def _yield_to_the_step_loop() -> None:
    """Compiling competes with the forward pass for the same cores (on a small CPU, a compile thread beside the
    matrix-multiply threads doubled the step time: every stream stalled while a large schema compiled). At a lower
    priority the compilation takes the time the steps leave; where priorities cannot be set it runs as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COMPILE_NICENESS)
    except (OSError, AttributeError):  # not Linux, or not permitted: compile at normal priority
        pass


class StructuredOutputs:
    """The engine's grammar service: parses at admission, compiles on its own threads (an LRU of compiled grammars
    keyed by ``GuidedDecodingParams.key``) and hands each sequence a ``GrammarState``. Thread-safe: the server
    admits requests from its own threads. ``on_compiled`` callbacks run (on a compiler thread) after each
    compilation, so an idle engine loop can wake up for the requests that waited on it."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: frozenset[int] | set[int],
                 on_compiled: list[Callable[[], None]] | None = None, max_cached: int = 256,
                 threads: int | None = None) -> None:
        import xgrammar as xgr

        stop = sorted(stop_token_ids) or None
        self._info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop)
        threads = threads or max(1, (os.cpu_count() or 2) // 2)
        # This class keeps the compiled grammars; xgrammar's own cache would hold a second copy.
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=threads, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flotilla-grammar",
                                        initializer=_yield_to_the_step_loop)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._max_cached = max_cached
        self.on_compiled = on_compiled if on_compiled is not None else []  # the caller may add to its list later

    def prepare(self, params: GuidedDecodingParams) -> Future:
        """Validate ``params`` now (``ValueError`` naming the field) and return the future of its compiled grammar,
        started on the compiler thread unless an equal grammar is cached or compiling."""
        key = params.key()
        with self._lock:
            future = self._reusable(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
        grammar = parse(params)  # outside the lock: other admissions need not wait for it
        with self._lock:
            future = self._reusable(key)  # an equal request may have started it meanwhile
            if future is None:
                future = self._pool.submit(self._compile, grammar, params.kind)
                future.add_done_callback(self._notify)
                self._cache[key] = future
                while len(self._cache) > self._max_cached:
                    self._cache.popitem(last=False)
            return future

    def _reusable(self, key: tuple) -> Future | None:
        """The cached compilation for ``key`` unless it failed (a failure is retried, never served)."""
        future = self._cache.get(key)
        if future is None or (future.done() and future.exception() is not None):
            return None
        return future

    def _compile(self, grammar: Any, kind: str) -> Any:
        compiled = self._compiler.compile_grammar(grammar)
        logger.debug("compiled a %s grammar (%d bytes)", kind, compiled.memory_size_bytes)
        return compiled

    def _notify(self, _: Future) -> None:
        for fn in list(self.on_compiled):
            fn()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def apply_bitmasks(logits: torch.Tensor, states: list[GrammarState | None]) -> dict[int, str]:
    """Mask, in place, every token row ``i``'s grammar does not allow next (-inf); rows without a grammar are left
    alone. Returns the rows whose grammar failed (its compilation, or its matcher), with why: those requests stop,
    the rest of the batch samples as usual."""
    import xgrammar as xgr

    rows, matchers, failed = [], [], {}
    for i, state in enumerate(states):
        if state is None:
            continue
        try:
            matchers.append(state.matcher)
            rows.append(i)
        except Exception as e:
            failed[i] = f"grammar compilation failed: {type(e).__name__}: {e}"
    if not rows:
        return failed
    bitmask = xgr.allocate_token_bitmask(len(states), logits.shape[-1])  # all ones: every token allowed
    for i, m in zip(rows, matchers):
        m.fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
    return failed
