"""``LLMEngine``: the synchronous engine loop (add_request / step / abort), with vLLM's names.

One step: the scheduler picks requests and token counts, the model runner computes and samples, and
``_update`` appends tokens, applies stop rules, frees finished requests' blocks and builds outputs.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Union

import torch

from flotilla.engine.block_manager import BlockManager, SwapPool
from flotilla.engine.cuda_graphs import graph_sizes, graphs_enabled
from flotilla.engine.config import CacheConfig, CompilationConfig, EngineArgs, SchedulerConfig, cpu_kvcache_gib_setting
from flotilla.engine.detokenizer import IncrementalDetokenizer
from flotilla.engine.host_memory import peak_rss_bytes, reset_peak_rss
from flotilla.engine.lora.registry import LoRARegistry
from flotilla.engine.lora.request import LoRARequest
from flotilla.engine.model_loader import (
    architecture,
    config_dtype,
    generation_eos_ids,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model,
)
from flotilla.engine.model_source import ModelSourceError, fetch, parse_model_uri
from flotilla.engine.model_runner import (
    ModelRunner,
    host_cache_blocks,
    kv_bytes_per_block,
    kv_cache_blocks,
    warm_up_plans,
)
from flotilla.engine.parallel import broadcast_plan, destroy_tensor_parallel, init_tensor_parallel, min_over_ranks
from flotilla.engine.tp_worker import Workers, WorkerSpec, cpu_threads
from flotilla.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from flotilla.engine.pooling import PoolingParams, PoolingState, check_dimensions, pooler_config, resolve_runner
from flotilla.engine.request import Request, RequestStatus
from flotilla.engine.sampling_params import RequestOutputKind, SamplingParams
from flotilla.engine.scheduler import Scheduler
from flotilla.engine.structured_output import GrammarState, StructuredOutputs

logger = logging.getLogger(__name__)

# A prompt: text, token ids, or vLLM's dict forms {"prompt": ...} / {"prompt_token_ids": [...]}.
PromptType = Union[str, list[int], dict[str, Any]]


@dataclass
class EngineStats:
    """Counters and gauges the metrics endpoint exports (vLLM's names in comments)."""

    num_running: int  # vllm:num_requests_running
    num_waiting: int  # vllm:num_requests_waiting
    num_swapped: int  # vllm:num_requests_swapped
    kv_cache_usage: float  # vllm:kv_cache_usage_perc
    num_preemptions: int  # vllm:num_preemptions_total
    prefix_cache_queries: int  # vllm:prefix_cache_queries_total
    prefix_cache_hits: int  # vllm:prefix_cache_hits_total
    prompt_tokens: int  # vllm:prompt_tokens_total (prompt tokens of requests that produced output)
    generation_tokens: int  # vllm:generation_tokens_total
    computed_prompt_tokens: int  # prompt positions actually run through the model (cache hits skip them)
    request_errors: int  # flotilla:request_errors_total: requests stopped because their own processing raised
    # vllm:lora_requests_info's labels: the adapters of running and waiting requests (names), max_loras (0: off)
    running_lora_adapters: list[str] = field(default_factory=list)
    waiting_lora_adapters: list[str] = field(default_factory=list)
    max_lora: int = 0


@dataclass
class _Parent:
    """A user request: ``n`` child sequences sharing one prompt and one set of metrics."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer | None]
    metrics: RequestMetrics
    error: str | None = None  # why the engine stopped it, when its own processing raised
    final_only: bool = False  # its output only when it finishes (RequestOutputKind.FINAL_ONLY)

    @property
    def finished(self) -> bool:
        return all(c.status.finished for c in self.children)


class LLMEngine:
    """Synchronous engine. ``add_request`` validates and queues; each ``step`` runs one batch and returns
    the ``RequestOutput`` of every request that made progress (cumulative text and tokens), or, for a request whose
    ``output_kind`` is ``FINAL_ONLY``, only once it has finished."""

    def __init__(self, args: EngineArgs) -> None:
        self.workers: Workers | None = None
        try:
            self._start(args)
        except BaseException:
            if self.workers is not None:  # never leave ranks waiting for a rank 0 that gave up
                self.workers.kill()
                destroy_tensor_parallel()
            raise

    def _start(self, args: EngineArgs) -> None:
        args.validate()
        self.args = args
        t0 = time.perf_counter()
        self.device = args.resolve_device()
        token = args.hf_token  # None: the hub client reads HF_TOKEN itself
        self.source = resolve_model(args.model, args.load_format, args.revision, args.download_dir, token)
        self.model_config = load_config(self.source)
        self.runner_type = resolve_runner(args.runner, args.task, architecture(self.model_config))
        # The pooling runner's pooling, from the model's sentence-transformers files and --pooler-config.
        self.pooler = pooler_config(self.source.folder, args.pooler_config) if self.runner_type == "pooling" else None
        if self.pooler is None and args.pooler_config is not None:
            raise ValueError("pooler_config: applies to the pooling runner only (--runner pooling)")
        prefix_caching = args.enable_prefix_caching
        if self.pooler is not None and self.pooler.pooling_type != "LAST" and prefix_caching:
            # a cached prefix is never computed again, and MEAN/CLS pooling need every prompt token's hidden state
            logger.info("prefix caching off: %s pooling reads the hidden state of every prompt token",
                        self.pooler.pooling_type)
            prefix_caching = False
        self.dtype = args.resolve_dtype(config_dtype(self.model_config), self.device)
        self.tokenizer = load_tokenizer(self.source, args.tokenizer, args.download_dir, token)
        self.eos_token_ids = generation_eos_ids(self.source, self.tokenizer, self.model_config)
        self.model_name = args.served_model_name or args.model or self.source.name

        limit = int(self.model_config.max_position_embeddings)
        max_model_len = args.max_model_len or limit
        if max_model_len > limit:
            raise ValueError(f"max_model_len: {max_model_len} exceeds the model's max_position_embeddings ({limit})")
        # the model reads the served context where it changes the computation (LongRoPE's factor set)
        self.model_config.flotilla_max_model_len = max_model_len
        max_batched = args.max_num_batched_tokens or (
            max(2048, args.max_num_seqs) if args.enable_chunked_prefill else max(max_model_len, args.max_num_seqs))
        if not args.enable_chunked_prefill and max_batched < max_model_len:
            raise ValueError(f"max_num_batched_tokens ({max_batched}) must be >= max_model_len ({max_model_len}) "
                             "when chunked prefill is disabled")
        setting = cpu_kvcache_gib_setting(args)
        kv_args = {"gpu_memory_utilization": args.gpu_memory_utilization, "max_num_batched_tokens": max_batched,
                   "override": args.num_gpu_blocks_override,
                   # all max_num_seqs sequences at full length four times over: the rest could only hold the
                   # prefix cache's evicted blocks
                   "max_blocks": 4 * args.max_num_seqs * -(-max_model_len // args.block_size),
                   "cpu_space_bytes": None if setting is None else int(setting * 2**30)}
        swap_gib = args.swap_space if args.preemption_mode == "swap" else None
        lora = None
        if args.enable_lora:
            if self.runner_type == "pooling":
                raise ValueError("enable_lora: LoRA adapters apply to generation, not the pooling runner")
            lora = (args.max_loras, args.max_lora_rank, args.max_cpu_loras or args.max_loras)
        if args.tensor_parallel_size > 1:
            # Ranks 1..N-1 in their own processes, rank 0 here; all load their shard of the same resolved model.
            self.workers = Workers(WorkerSpec(args.tensor_parallel_size, self.source, self.dtype,
                                              self.device.type, args.block_size, args.seed, kv_args, swap_gib,
                                              max_model_len, lora))
            if self.device.type == "cpu":
                torch.set_num_threads(cpu_threads(args.tensor_parallel_size))
            self.workers.join(lambda rendezvous: init_tensor_parallel(0, args.tensor_parallel_size, rendezvous))
        torch.manual_seed(args.seed)
        model = load_model(self.source, self.model_config, self.dtype, self.device, args.seed)
        self.runner = ModelRunner(model, self.model_config, self.device, self.dtype, args.block_size, args.seed,
                                  self.pooler)
        self.lora: LoRARegistry | None = None
        if lora is not None:  # the slots are allocated before the KV cache is sized beside them
            self.lora = LoRARegistry(self.runner.enable_lora(*lora), self._adapter_folder)
        # On one CPU rank the warm-up runs first, on a one-block cache, so that the KV cache is sized beside the
        # measured peak of the largest steps: under a container memory limit that peak must fit too.
        warm_first = args.warmup and self.device.type == "cpu" and args.tensor_parallel_size == 1
        used = None
        if warm_first:
            self.runner.allocate_kv_cache(1)
            reset_peak_rss()
            self._warm_up(args, max_batched, max_model_len)
            used = peak_rss_bytes()
        num_blocks = min_over_ranks(kv_cache_blocks(self.runner, **kv_args, used=used))
        capacity = num_blocks * args.block_size
        if capacity < max_model_len:
            if args.max_model_len is not None:
                raise ValueError(f"max_model_len ({max_model_len}) is larger than the KV cache holds ({capacity} "
                                 "tokens): lower max_model_len or give the cache more memory")
            max_model_len = capacity
        self.runner.allocate_kv_cache(num_blocks)
        self.cache_config = CacheConfig(args.block_size, num_blocks, prefix_caching)
        self.scheduler_config = SchedulerConfig(args.max_num_seqs, max_batched, max_model_len,
                                                args.enable_chunked_prefill, args.preemption_mode,
                                                args.max_loras if lora is not None else 0)
        self.block_manager = BlockManager(num_blocks, args.block_size, prefix_caching)
        swap_pool = None
        if swap_gib is not None:
            num_host_blocks = host_cache_blocks(self.model_config, args.block_size, self.dtype, swap_gib)
            self.runner.allocate_host_cache(num_host_blocks)
            swap_pool = SwapPool(num_host_blocks)
            logger.info("swap space: %d host blocks (%.2f GiB)", num_host_blocks, args.swap_space)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager, swap_pool)
        self.max_model_len = max_model_len
        if args.warmup and not warm_first:
            self._warm_up(args, max_batched, max_model_len)
        if self.pooler is None and graphs_enabled(self.device, args.enforce_eager, args.tensor_parallel_size):
            decode, mixed = graph_sizes(CompilationConfig.parse(args.compilation_config), args.max_num_seqs,
                                        max_batched)
            if decode is not None:
                self.runner.capture_graphs(decode, max_model_len)
            if mixed is not None:
                self.runner.capture_piecewise(mixed)
        self._parents: dict[str, _Parent] = {}
        self._children: dict[str, tuple[_Parent, int]] = {}
        self._structured: StructuredOutputs | None = None  # made with the first request that has a grammar
        self._structured_lock = threading.Lock()
        self.on_grammar_compiled: list[Callable[[], None]] = []  # run (on a compiler thread) as a grammar is ready
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.computed_prompt_tokens = 0
        self.request_errors_total = 0
        self.model_load_seconds = time.perf_counter() - t0
        logger.info(
            "engine ready: model %s (%s runner), %s on %s, attention %s, %d KV blocks x %d tokens (%.2f GiB), "
            "max_model_len %d, load %.1fs", self.source.name, self.runner_type, self.dtype, self.device,
            self.runner.backend.name, num_blocks,
            args.block_size, num_blocks * kv_bytes_per_block(self.model_config, args.block_size, self.dtype) / 2**30,
            max_model_len, self.model_load_seconds)

    def _warm_up(self, args: EngineArgs, max_batched: int, max_model_len: int) -> None:
        t = time.perf_counter()
        plans = warm_up_plans(args.max_num_seqs, max_batched, max_model_len, args.block_size,
                              pooling=self.pooler is not None)
        self.runner.warm_up(plans)
        logger.info("warm-up: %d steps of the served shapes in %.1fs", len(plans), time.perf_counter() - t)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    # ---- adapters (vLLM's add_lora / remove_lora / list_loras) -------------------------------------------

    def _adapter_folder(self, path: str) -> str:
        """An adapter's path made local, as the base model's is (a folder, a hub repo id, s3://)."""
        try:
            ref = parse_model_uri(path)
            if ref.gguf is not None:
                raise ModelSourceError(f"lora_path: {path!r}: adapters are PEFT folders, not GGUF files")
            return str(fetch(ref, self.args.download_dir, self.args.hf_token))
        except ModelSourceError as e:
            raise ValueError(str(e).replace("model: ", "lora_path: ", 1)) from None

    def _registry(self) -> LoRARegistry:
        if self.lora is None:
            raise ValueError("LoRA adapters need the engine started with enable_lora=True (--enable-lora)")
        return self.lora

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Register an adapter (read and checked now: ``ValueError`` says why it cannot be served); False when it
        is already registered."""
        return self._registry().add(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        """Unregister an adapter: new requests can no longer name it; those running finish with it."""
        return self._registry().remove(lora_id)

    def list_loras(self) -> set[int]:
        return {a.request.lora_int_id for a in self._registry().adapters()}

    def _adapter_for(self, lora_request: LoRARequest | None) -> str | None:
        """The local folder of a request's adapter, registering it first when it is new (as vLLM loads an adapter
        on the first request that names it)."""
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request: expected LoRARequest, got {type(lora_request).__name__}")
        registry = self._registry()
        held = registry.get(lora_request.lora_int_id)
        if held is None:
            registry.add(lora_request)
            held = registry.get(lora_request.lora_int_id)
        if held is None or held.request != lora_request:
            raise ValueError(f"lora_request: id {lora_request.lora_int_id} is adapter "
                             f"{held.request.lora_name if held else '(removed)'!r}, not {lora_request.lora_name!r}")
        return held.folder

    def check_alive(self) -> None:
        """Raise when a tensor-parallel worker has died: this engine can compute nothing more."""
        if self.workers is not None and (dead := self.workers.dead()):
            raise RuntimeError(f"tensor-parallel worker died: {', '.join(dead)}")

    def shutdown(self) -> None:
        """Stop the grammar compiler and the tensor-parallel workers. The engine serves nothing after."""
        if self._structured is not None:
            self._structured.shutdown()
        if self.workers is None:
            return
        workers, self.workers = self.workers, None
        try:
            if not workers.dead():
                broadcast_plan(None)
        finally:
            workers.stop()
            destroy_tensor_parallel()

    # ---- requests -----------------------------------------------------------------------------------

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def make_requests(self, request_id: str, prompt: PromptType, params: SamplingParams | None,
                      arrival_time: float | None = None, cache_salt: str | None = None,
                      pooling_params: PoolingParams | None = None, lora_request: LoRARequest | None = None) -> _Parent:
        """Validate and tokenize without touching engine state (safe to call from another thread). An embedding
        request gives ``pooling_params`` (and no ``params``): the pooling runner's engine takes only those.
        ``lora_request``: the adapter it runs with (registered now if it is new)."""
        pooling = pooling_params is not None
        if pooling != (self.pooler is not None):
            raise ValueError("embeddings need the pooling runner: start the model with --runner pooling (vLLM's "
                             "--task embed)" if pooling else
                             "this model runs the pooling runner: it serves embeddings (LLM.embed, /v1/embeddings), "
                             "not generation")
        if pooling:
            check_dimensions(pooling_params.dimensions, self.model_config)
            params = SamplingParams(max_tokens=1, detokenize=False)  # the prompt is computed once, then pooled
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        if request_id in self._parents:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        if not token_ids:
            raise ValueError("prompt: must not be empty")
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        if len(token_ids) > self.max_model_len or (len(token_ids) == self.max_model_len and not pooling):
            raise ValueError(f"prompt: {len(token_ids)} tokens leave no room to generate within max_model_len "
                             f"({self.max_model_len})")
        params = params.bind(self.eos_token_ids, self._bad_words_token_ids(params.bad_words))
        params.check_token_ids(vocab)
        lora_folder = self._adapter_for(lora_request)
        compiled = self.structured_outputs().prepare(params.guided_decoding) if params.guided_decoding else None
        metrics = RequestMetrics(arrival_time=arrival_time or time.time())
        children = []
        for i in range(params.n):
            generator = None
            if params.seed is not None:
                # Each of the n samples gets its own stream, so n > 1 with a seed is not n copies.
                generator = torch.Generator(device=self.device).manual_seed(params.seed + i)
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            children.append(Request(child_id, token_ids, params, metrics, self.max_model_len, cache_salt,
                                    parent_id=request_id, index=i, generator=generator,
                                    grammar=GrammarState(compiled) if compiled is not None else None,
                                    pooling=PoolingState(self.pooler, pooling_params) if pooling else None,
                                    lora_request=lora_request, lora_folder=lora_folder))
        needed = self.block_manager.blocks_needed(children[0].max_total_tokens)
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"prompt: needs {needed} KV blocks but the cache has {self.block_manager.num_blocks}; "
                             "it could never be scheduled")
        detoks = [
            IncrementalDetokenizer(self.tokenizer, token_ids, params.stop, params.include_stop_str_in_output,
                                   params.skip_special_tokens) if params.detokenize else None
            for _ in children
        ]
        return _Parent(request_id, text, token_ids, children, detoks, metrics,
                       final_only=params.output_kind == RequestOutputKind.FINAL_ONLY)

    def structured_outputs(self) -> StructuredOutputs:
        """The grammar service, made on first use (it imports xgrammar and indexes the vocabulary)."""
        with self._structured_lock:
            if self._structured is None:
                self._structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids,
                                                     on_compiled=self.on_grammar_compiled)
            return self._structured

    def grammars_blocking(self) -> list[Future]:
        """When nothing can run until a grammar compiles (nothing running or swapped, every waiting request still
        compiling), the compilations to wait for; otherwise none."""
        sched = self.scheduler
        if sched.running or sched.swapped or any(r.schedulable for r in sched.waiting):
            return []
        return [r.grammar.compilation for r in sched.waiting if r.grammar is not None]

    def _bad_words_token_ids(self, words: list[str] | None) -> list[list[int]]:
        """Each bad word as it tokenizes alone and after a space (mid-sentence), as vLLM bans them."""
        seqs: list[list[int]] = []
        for word in words or ():
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in seqs:
                    seqs.append(ids)
        return seqs

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")

    def enqueue(self, parent: _Parent) -> None:
        if parent.request_id in self._parents:
            raise ValueError(f"request_id: {parent.request_id!r} is already in use")
        self._parents[parent.request_id] = parent
        for i, child in enumerate(parent.children):
            self._children[child.request_id] = (parent, i)
            self.scheduler.add(child)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams | None = None,
                    arrival_time: float | None = None, cache_salt: str | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        """vLLM's: ``params`` is a request's SamplingParams, or PoolingParams for an embedding."""
        if isinstance(params, PoolingParams):
            self.enqueue(self.make_requests(request_id, prompt, None, arrival_time, cache_salt, pooling_params=params,
                                            lora_request=lora_request))
        else:
            self.enqueue(self.make_requests(request_id, prompt, params, arrival_time, cache_salt,
                                            lora_request=lora_request))

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Abort requests (unknown or finished ids are ignored); their blocks are freed at once."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outputs = []
        for rid in ids:
            parent = self._parents.get(rid)
            if parent is None:
                continue
            for child in parent.children:
                if not child.status.finished:
                    self._finish(child, RequestStatus.FINISHED_ABORTED)
            outputs.append(self._output(parent))
            self._forget(parent)
        return outputs

    abort = abort_request

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ---- the loop -----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.empty:
            return []
        now = time.time()
        for s in sched.scheduled:
            if s.request.metrics.first_scheduled_time is None:
                s.request.metrics.first_scheduled_time = now
        result = self.runner.execute(sched)
        return self._update(sched, result)

    def _update(self, sched, result) -> list[RequestOutput]:
        now = time.time()
        changed: dict[str, _Parent] = {}
        for s in sched.scheduled:
            r = s.request
            if r.status.finished:  # a sibling's failure stopped it earlier in this loop
                continue
            parent, _ = self._children[r.request_id]
            if r.request_id in result.failed:
                self._fail(parent, result.failed[r.request_id])
                changed[parent.request_id] = parent
                continue
            start = r.num_computed_tokens
            self.computed_prompt_tokens += max(min(start + s.num_new_tokens, r.num_prompt_tokens) - start, 0)
            r.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(r)
            lps = result.prompt_logprobs.get(r.request_id)
            if lps is not None:
                if r.prompt_logprobs is None:
                    r.prompt_logprobs = [None]
                if len(r.prompt_logprobs) == start + 1:  # not already recorded before a preemption
                    r.prompt_logprobs.extend(lps)
            if r.pooling is not None:
                r.pooling.add(result.pooled[r.request_id], s.num_new_tokens, start == 0)
                if r.num_computed_tokens == r.num_prompt_tokens:
                    self._pooled(parent, r, now)
                    changed[parent.request_id] = parent
                continue
            token = result.sampled.get(r.request_id)
            if token is None:
                continue
            try:
                self._append(parent, r, token, result.logprobs.get(r.request_id), now)
            except Exception as e:  # detokenizing or stop checks of this request: stop it, keep the batch
                logger.exception("request %s: output processing failed", parent.request_id)
                self._fail(parent, f"{type(e).__name__}: {e}")
            changed[parent.request_id] = parent
        outputs = []
        for parent in changed.values():
            if parent.finished:
                outputs.append(self._output(parent))
                self._forget(parent)
            elif not parent.final_only:
                outputs.append(self._output(parent))
        return outputs

    def _append(self, parent: _Parent, r: Request, token: int, logprobs, now: float) -> None:
        r.append_token(token)
        self.generation_tokens_total += 1
        m = r.metrics
        if m.first_token_time is None:
            m.first_token_time = now
            self.prompt_tokens_total += r.num_prompt_tokens
        m.last_token_time = now
        if logprobs is not None:
            r.cumulative_logprob += logprobs[token].logprob
            r.logprobs.append(logprobs)  # type: ignore[union-attr]
        p = r.sampling_params
        n_out = len(r.output_token_ids)
        may_stop = n_out >= p.min_tokens
        grammar_done = r.grammar is not None and r.grammar.terminated  # it took its stop token: nothing may follow
        eos = may_stop and not p.ignore_eos and token in p._eos_token_ids
        stop_id = may_stop and token in (p.stop_token_ids or ())
        # The token that stops a request (a grammar ends on one too) is not part of its text (as in vLLM), unless
        # include_stop_str_in_output: with skip_special_tokens=False it would otherwise end the text as "<|im_end|>".
        hidden = (grammar_done or eos or stop_id) and not p.include_stop_str_in_output
        detok = parent.detokenizers[r.index]
        stop_str = detok.update(token, check_stop=may_stop) if detok is not None and not hidden else None
        if grammar_done or eos:
            self._finish(r, RequestStatus.FINISHED_STOPPED)
        elif stop_id:
            r.stop_reason = token
            self._finish(r, RequestStatus.FINISHED_STOPPED)
        elif stop_str is not None:
            r.stop_reason = stop_str
            self._finish(r, RequestStatus.FINISHED_STOPPED)
        elif r.num_tokens >= r.max_total_tokens:
            self._finish(r, RequestStatus.FINISHED_LENGTH)

    def _pooled(self, parent: _Parent, r: Request, now: float) -> None:
        """The prompt of an embedding request is all computed: pool it, and it is done."""
        try:
            r.pooling.finish()  # type: ignore[union-attr]
        except Exception as e:  # its own fault (nothing in its prompt to pool): stop it, keep the batch
            logger.exception("request %s: pooling failed", parent.request_id)
            self._fail(parent, f"{type(e).__name__}: {e}")
            return
        r.metrics.first_token_time = r.metrics.last_token_time = now
        self.prompt_tokens_total += r.num_prompt_tokens
        self._finish(r, RequestStatus.FINISHED_STOPPED)

    def _fail(self, parent: _Parent, reason: str) -> None:
        """Stop every sequence of a request whose own processing raised and free their blocks; the
        request's output carries the reason and finish_reason "error"."""
        if parent.error is None:
            self.request_errors_total += 1
            parent.error = reason
        for child in parent.children:
            if not child.status.finished:
                self._finish(child, RequestStatus.FINISHED_ERROR)

    def _finish(self, r: Request, status: RequestStatus) -> None:
        self.scheduler.finish(r, status)
        r.metrics.finished_time = time.time()

    def _forget(self, parent: _Parent) -> None:
        self._parents.pop(parent.request_id, None)
        for child in parent.children:
            self._children.pop(child.request_id, None)

    def _output(self, parent: _Parent) -> RequestOutput:
        finished = parent.finished
        outputs = []
        for child, detok in zip(parent.children, parent.detokenizers):
            outputs.append(CompletionOutput(
                index=child.index,
                text=detok.visible_text(child.status.finished) if detok is not None else "",
                token_ids=list(child.output_token_ids),
                cumulative_logprob=child.cumulative_logprob if child.logprobs is not None else None,
                logprobs=list(child.logprobs) if child.logprobs is not None else None,
                finish_reason=child.status.value if child.status.finished else None,
                stop_reason=child.stop_reason,
            ))
        first = parent.children[0]
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=list(first.prompt_logprobs) if first.prompt_logprobs is not None else None,
            outputs=outputs,
            finished=finished,
            metrics=parent.metrics,
            num_cached_tokens=parent.metrics.num_cached_tokens,
            error=parent.error,
            embedding=first.pooling.embedding if first.pooling is not None else None,
            lora_request=first.lora_request,
        )

    # ---- introspection ------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_swapped=len(self.scheduler.swapped),
            kv_cache_usage=bm.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
            computed_prompt_tokens=self.computed_prompt_tokens,
            request_errors=self.request_errors_total,
            running_lora_adapters=_adapter_names(self.scheduler.running),
            waiting_lora_adapters=_adapter_names([*self.scheduler.waiting, *self.scheduler.swapped]),
            max_lora=self.scheduler_config.max_loras,
        )

    def kv_token_utilization(self) -> float:
        """Tokens stored / capacity of the blocks the running requests hold: how much of the allocated KV
        memory is real data (internal fragmentation is the rest)."""
        running = self.scheduler.running
        held = sum(len(r.block_ids) for r in running) * self.block_manager.block_size
        return sum(r.num_computed_tokens for r in running) / held if held else 0.0


def _adapter_names(requests: Iterable[Request]) -> list[str]:
    return sorted({r.lora_request.lora_name for r in requests if r.lora_request is not None})
