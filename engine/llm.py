"""``LLM``: offline batch generation, vLLM's entry point for scripts and benchmarks."""

from __future__ import annotations

import dataclasses
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any, Sequence

from tqdm.auto import tqdm

from flotilla.engine.config import EngineArgs
from flotilla.engine.llm_engine import LLMEngine, PromptType
from flotilla.engine.lora.request import LoRARequest
from flotilla.engine.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from flotilla.engine.pooling import PoolingParams
from flotilla.engine.sampling_params import RequestOutputKind, SamplingParams


def _prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]


def _per_prompt(params: Any, count: int, default: Any, name: str) -> list[Any]:
    if isinstance(params, Sequence):
        if len(params) != count:
            raise ValueError(f"{name}: a list must have one entry per prompt")
        return list(params)
    return [params or default] * count


def _final_only(params: list[Any]) -> list[Any]:
    """Copies that yield their output once, when finished: ``generate`` returns nothing else (as vLLM's sets it). One
    copy per distinct object; anything not a SamplingParams is left for the engine to refuse."""
    copies: dict[int, Any] = {}
    for p in params:
        if isinstance(p, SamplingParams) and id(p) not in copies:
            copies[id(p)] = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
    return [copies.get(id(p), p) for p in params]


class LLM:
    """``LLM(model, **engine_args).generate(prompts, sampling_params)``. ``model=None`` serves the bundled
    SmolLM2-135M-Instruct."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(EngineArgs.from_kwargs(model=model, **kwargs))
        self._counter = 0

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of ``prompts``. ``lora_request``: the
        adapter every prompt runs with, or one per prompt (None: the base model); needs ``enable_lora=True``."""
        prompts = _prompt_list(prompts)
        params = _final_only(_per_prompt(sampling_params, len(prompts), SamplingParams(), "sampling_params"))
        loras = _per_prompt(lora_request, len(prompts), None, "lora_request")
        return self._run(self._enqueue(prompts, params, {"lora_request": loras}), use_tqdm)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (the pooling runner: ``LLM(model, runner="pooling")``), in order."""
        prompts = _prompt_list(prompts)
        params = _per_prompt(pooling_params, len(prompts), PoolingParams(), "pooling_params")
        outputs = self._run(self._enqueue(prompts, [None] * len(prompts), {"pooling_params": params}), use_tqdm)
        for out in outputs:
            if out.embedding is None:
                raise RuntimeError(f"request {out.request_id}: {out.error or 'no embedding'}")
        return [EmbeddingRequestOutput(o.request_id, EmbeddingOutput(o.embedding), o.prompt_token_ids)
                for o in outputs]

    def _enqueue(self, prompts: list[PromptType], params: list[Any], per_prompt: dict[str, list[Any]]) -> list[str]:
        """Validate every request before queueing any, so a bad prompt leaves the engine untouched."""
        engine = self.llm_engine
        parents = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            extra = {name: values[i] for name, values in per_prompt.items()}
            parents.append(engine.make_requests(str(self._counter), prompt, p, **extra))
            self._counter += 1
        for parent in parents:
            engine.enqueue(parent)
        return [p.request_id for p in parents]

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (or a list of them) and generate. ``tools``
        (OpenAI's function definitions) and ``chat_template_kwargs`` (``enable_thinking``...) reach the template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts: list[PromptType] = []
        for conv in conversations:
            ids = tok.apply_chat_template(conv, chat_template=chat_template, tokenize=True, tools=tools,
                                          add_generation_prompt=add_generation_prompt and not continue_final_message,
                                          continue_final_message=continue_final_message, return_dict=False,
                                          **(chat_template_kwargs or {}))
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        results[out.request_id] = out
                        pending.discard(out.request_id)
                        bar.update(1)
                compiling = engine.grammars_blocking()
                if compiling:
                    wait(compiling, return_when=FIRST_COMPLETED)
        except BaseException:
            engine.abort_request(list(pending))  # leave the engine clean for the next call
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]
