"""FastAPI routes with OpenAI's shapes: chat and text completions (streamed or not), models, tokenize,
health, metrics, version. Errors always come back as ``{"error": {...}}`` with the right status."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from flotilla.engine.async_engine import AsyncLLMEngine
from flotilla.engine.errors import EngineDeadError, QueueFullError, RequestFailedError
from flotilla.engine.lora.request import LoRARequest
from flotilla.engine.outputs import CompletionOutput, LogprobDict, RequestOutput
from flotilla.engine.pooling import PoolingParams
from flotilla.engine.server import reasoning, tool_parsers
from flotilla.engine.server.chat_output import ChatOutputParser, ChoiceStream
from flotilla.engine.server.chat_template import apply_chat_template
from flotilla.engine.server.metrics import ServerMetrics
from flotilla.engine.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)

logger = logging.getLogger("flotilla.engine.server")

VERSION = "0.1.0"
# Routes that need the API key; /health, /metrics and /version stay open for probes and scrapers.
_PROTECTED = ("/v1/", "/tokenize", "/detokenize")


@dataclass
class ServerState:
    served_model_names: list[str]
    model_path: str
    api_key: str | None = None
    chat_template: str | None = None
    # vLLM's --trust-request-chat-template: a template in a request is code the server would run.
    trust_request_chat_template: bool = False
    chat_template_timeout: float = 10.0  # seconds one render may take
    max_n: int = 128  # completions one request may ask for (OpenAI's own cap)
    max_body_bytes: int = 16 * 2**20
    log_requests: bool = True
    # vLLM's --enable-auto-tool-choice with --tool-call-parser, and --reasoning-parser (names in the parser modules)
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING: /v1/load_lora_adapter and /v1/unload_lora_adapter exist
    allow_runtime_lora: bool = False
    engine: AsyncLLMEngine | None = None  # None while the model loads
    load_error: str | None = None
    draining: bool = False
    started: float = field(default_factory=time.time)

    def ready_engine(self) -> AsyncLLMEngine:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="draining", headers={"Retry-After": "5"})
        if self.engine is None:
            why = f"model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, why, code="loading", headers={"Retry-After": "10"})
        if self.engine.errored is not None:
            raise _dead_error()
        return self.engine


class GuardMiddleware:
    """Pure ASGI (streaming-safe): bearer-key check and a cap on request body size."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        key = self.state.api_key
        if key and path.startswith(_PROTECTED):
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return await _send_error(send, APIError(401, "invalid or missing API key", code="invalid_api_key",
                                                        headers={"WWW-Authenticate": "Bearer"}))
        limit = self.state.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_error(send, APIError(413, f"request body over {limit} bytes", code="body_too_large"))
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except APIError as e:  # only the body cap reaches here; route errors are handled by FastAPI
            await _send_error(send, e)


async def _send_error(send: Callable, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="Flotilla", version=VERSION)
    metrics = ServerMetrics(state.served_model_names[0], lambda: state.engine.engine if state.engine else None)
    app.add_middleware(GuardMiddleware, state=state)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else first.get("msg", "invalid JSON")
        return _error_response(APIError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own answers (unknown route, wrong method, an unparsable body) in OpenAI's shape too.
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return _error_response(APIError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(_api_error_of(exc))

    # ---- probes and facts -----------------------------------------------------------------------

    @app.get("/health", response_class=Response,
             responses={200: {"description": "Ready: the model is loaded and the engine loop runs."},
                        503: {"description": "Loading, draining, or the engine has died."}})
    async def health() -> Response:
        """vLLM's probe: an empty 200 while the engine serves, an empty 503 otherwise."""
        if state.draining or state.engine is None or state.engine.errored is not None:
            return Response(status_code=503, headers={"Retry-After": "5"})
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict:
        return {"version": VERSION}

    @app.get("/v1/models")
    async def models() -> dict:
        engine = state.ready_engine()
        cards = [{"id": name, "object": "model", "created": int(state.started), "owned_by": "flotilla",
                  "root": state.model_path, "parent": None, "max_model_len": engine.engine.max_model_len}
                 for name in state.served_model_names]
        registry = engine.engine.lora
        for adapter in registry.adapters() if registry is not None else ():
            lora = adapter.request
            cards.append({"id": lora.lora_name, "object": "model", "created": int(state.started),
                          "owned_by": "flotilla", "root": lora.lora_path,
                          "parent": lora.base_model_name or state.served_model_names[0],
                          "max_model_len": engine.engine.max_model_len})
        return {"object": "list", "data": cards}

    def check_model(name: str | None, engine: AsyncLLMEngine | None = None) -> LoRARequest | None:
        """The adapter a request's ``model`` names (None: the base model); 404 for a name not served."""
        if name is None or name in state.served_model_names:
            return None
        registry = engine.engine.lora if engine is not None else None
        adapter = registry.by_name(name) if registry is not None else None
        if adapter is None:
            raise APIError(404, f"The model `{name}` does not exist.", "model", code="model_not_found")
        return adapter.request

    if state.allow_runtime_lora:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(req: LoadLoRAAdapterRequest) -> Response:
            """vLLM's: register an adapter at run time (read and checked before the answer)."""
            engine = state.ready_engine()
            registry = engine.engine.lora
            if registry is None:
                raise APIError(400, "LoRA adapters need the server started with --enable-lora", "lora_name")
            if not req.lora_name or not req.lora_path:
                raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.", "lora_name")
            if req.lora_name in state.served_model_names:
                raise APIError(400, f"lora_name: {req.lora_name!r} is the base model's name", "lora_name")
            lora = LoRARequest(req.lora_name, registry.new_id(), req.lora_path)
            try:
                await asyncio.to_thread(engine.engine.add_lora, lora)  # reads (maybe downloads) the adapter
            except ValueError as e:
                raise APIError(400, str(e), "lora_path") from None
            logger.info("LoRA adapter %s loaded from %s", req.lora_name, req.lora_path)
            return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(req: UnloadLoRAAdapterRequest) -> Response:
            """vLLM's: unregister an adapter; requests already running with it finish."""
            engine = state.ready_engine()
            registry = engine.engine.lora
            adapter = registry.by_name(req.lora_name) if registry is not None else None
            if adapter is None or not engine.engine.remove_lora(adapter.request.lora_int_id):
                raise APIError(404, f"The lora adapter '{req.lora_name}' cannot be found.", "lora_name",
                               code="model_not_found")
            logger.info("LoRA adapter %s unloaded", req.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    def check_queue(engine: AsyncLLMEngine) -> None:
        """Early refusal before any work; the binding check is the engine's, made as the request queues."""
        limit = engine.max_queue_len
        if limit is not None and engine.num_waiting() >= limit:
            raise _api_error_of(QueueFullError(limit))

    def check_n(n: int, best_of: int | None) -> None:
        if n > state.max_n:
            raise APIError(400, f"n: must be at most {state.max_n}, got {n}", "n")
        if best_of is not None and best_of != n:
            raise APIError(400, "best_of: only best_of equal to n is supported", "best_of")

    async def template_ids(engine: AsyncLLMEngine, messages: list[dict], add_generation_prompt: bool,
                           template: str | None, kwargs: dict | None, continue_final: bool = False,
                           tools: list[dict] | None = None) -> list[int]:
        if template is not None and not state.trust_request_chat_template:
            raise APIError(400, "chat_template: templates in requests are refused; the server must be started "
                                "with --trust-request-chat-template to accept them", "chat_template")
        return await apply_chat_template(
            engine.get_tokenizer(), messages, template=template or state.chat_template,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final,
            kwargs=kwargs, timeout=state.chat_template_timeout, tools=tools)

    def output_parser(req: ChatCompletionRequest, mode: str, constrained: bool) -> ChatOutputParser:
        """How this request's generated text becomes a message: reasoning, tool calls (see chat_output). A grammar
        (``constrained``) holds from the first token, so such an output has no thinking to split off."""
        if mode == "auto" and state.tool_call_parser is None:
            raise APIError(400, '"auto" tool choice requires the server to be started with --enable-auto-tool-choice '
                                "and --tool-call-parser", "tool_choice")
        named = req.named_tool()
        return ChatOutputParser(
            reasoning=reasoning.PARSERS[state.reasoning_parser]() if state.reasoning_parser and not constrained
            else None,
            tools=tool_parsers.PARSERS[state.tool_call_parser]() if mode == "auto" else None,
            named=named.name if named is not None else None, required=mode == "required")

    # ---- tokenizer routes -------------------------------------------------------------------------

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        engine = state.ready_engine()
        check_model(req.model, engine)
        if req.messages is not None:
            ids = await template_ids(engine, [m.model_dump() for m in req.messages], req.add_generation_prompt,
                                     None, None)
        elif req.prompt is not None:
            ids = engine.get_tokenizer().encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "prompt: either prompt or messages is required", "prompt")
        return {"count": len(ids), "max_model_len": engine.engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        engine = state.ready_engine()
        check_model(req.model, engine)
        vocab = engine.engine.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise APIError(400, f"tokens: ids must be in [0, {vocab})", "tokens")
        return {"prompt": engine.get_tokenizer().decode(req.tokens)}

    # ---- completions ------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        engine = state.ready_engine()
        lora = check_model(req.model, engine)
        check_n(req.n, req.best_of)
        check_queue(engine)
        mode = req.tool_choice_mode()
        messages = [m.for_template() for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        prompt_ids = await template_ids(engine, messages, req.add_generation_prompt, req.chat_template,
                                        req.chat_template_kwargs, req.continue_final_message, tools)
        max_tokens = _max_tokens(req.requested_max_tokens(), len(prompt_ids), engine.engine.max_model_len,
                                 "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
        # A tool parser reads markers that some tokenizers make special tokens ([TOOL_CALLS], <|python_tag|>).
        params = req.sampling_params(max_tokens, req.requested_logprobs(), keep_special_tokens=mode == "auto")
        parser = output_parser(req, mode, constrained=params.guided_decoding is not None)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        model = req.model or state.served_model_names[0]
        stream = await _start(engine, {"prompt_token_ids": prompt_ids}, params, request_id, req.cache_salt, lora)
        if state.log_requests:
            logger.info("%s: chat, %d prompt tokens, max_tokens %d, n %d", request_id, len(prompt_ids),
                        max_tokens, params.n)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_chat_chunks(stream, request_id, model, usage, engine, metrics, params.logprobs or 0,
                                     parser))
        final = await _collect(stream, raw)
        metrics.observe_finished(final)
        tok = engine.get_tokenizer()
        choices = [{
            "index": c.index,
            "message": parser.message(c.text),
            "logprobs": ({"content": _chat_logprobs(tok, c.token_ids, c.logprobs, params.logprobs or 0)}
                         if c.logprobs is not None else None),
            "finish_reason": parser.finish_reason(c.text, c.finish_reason),
            "stop_reason": c.stop_reason,
        } for c in final.outputs]
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": int(time.time()),
                             "model": model, "choices": choices, "usage": _usage(final)})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        engine = state.ready_engine()
        lora = check_model(req.model, engine)
        check_n(req.n, req.best_of)
        check_queue(engine)
        if req.suffix:
            raise APIError(400, "suffix: is not supported", "suffix")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise APIError(400, "logprobs: must be between 0 and 20", "logprobs")
        tok = engine.get_tokenizer()
        prompts = _token_ids(tok, req.prompts(), "prompt")
        model = req.model or state.served_model_names[0]
        base_id = f"cmpl-{uuid.uuid4().hex}"

        def params_for(ids: list[int]) -> Any:
            max_tokens = _max_tokens(req.max_tokens, len(ids), engine.engine.max_model_len, "max_tokens")
            prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
            return req.sampling_params(max_tokens, req.logprobs, prompt_lp)

        streams = await _start_all(engine, prompts, params_for, base_id, req.cache_salt, lora)
        n = req.n
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_completion_chunks(streams, base_id, model, n, req.echo, usage, engine, metrics))
        finals = await _collect_all(streams, raw)
        choices = []
        for i, final in enumerate(finals):
            metrics.observe_finished(final)
            for c in final.outputs:
                text = c.text
                lp = None
                if c.logprobs is not None:
                    lp = _completion_logprobs(tok, final, c, req.echo)
                if req.echo:
                    text = tok.decode(final.prompt_token_ids) + text
                choices.append({"index": i * n + c.index, "text": text, "logprobs": lp,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        usage = {"prompt_tokens": sum(len(f.prompt_token_ids) for f in finals),
                 "completion_tokens": sum(len(c.token_ids) for f in finals for c in f.outputs)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        usage["prompt_tokens_details"] = {"cached_tokens": sum(f.num_cached_tokens for f in finals)}
        return JSONResponse({"id": base_id, "object": "text_completion", "created": int(time.time()),
                             "model": model, "choices": choices, "usage": usage})

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, raw: Request) -> Response:
        engine = state.ready_engine()
        check_model(req.model)
        if engine.engine.pooler is None:
            raise APIError(400, "this model serves generation, not embeddings: start it with --runner pooling",
                           "model", code="model_not_supported")
        if req.encoding_format not in ("float", "base64"):
            raise APIError(400, f"encoding_format: must be 'float' or 'base64', got {req.encoding_format!r}",
                           "encoding_format")
        check_queue(engine)
        prompts = _token_ids(engine.get_tokenizer(), req.inputs(), "input")
        params = PoolingParams(dimensions=req.dimensions, normalize=req.normalize)
        base_id = f"embd-{uuid.uuid4().hex}"
        finals = await _collect_all(await _start_all(engine, prompts, lambda _: params, base_id, None), raw)
        data = []
        for i, final in enumerate(finals):
            metrics.observe_finished(final)
            data.append({"object": "embedding", "index": i,
                         "embedding": _encode_embedding(final.embedding, req.encoding_format)})
        used = sum(len(f.prompt_token_ids) for f in finals)
        return JSONResponse({"id": base_id, "object": "list", "created": int(time.time()),
                             "model": req.model or state.served_model_names[0], "data": data,
                             "usage": {"prompt_tokens": used, "total_tokens": used}})

    return app


# ---- helpers (pure where they can be) ---------------------------------------------------------------


def _encode_embedding(vector: list[float] | None, encoding_format: str) -> list[float] | str:
    """OpenAI's two encodings: a list of floats, or base64 of the little-endian float32 bytes (what the openai SDK
    asks for by default and decodes itself)."""
    assert vector is not None
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def _dead_error() -> APIError:
    return APIError(503, "the engine has failed and this server is exiting; retry on another replica",
                    code="engine_dead", headers={"Retry-After": "5"})


def _api_error_of(e: BaseException) -> APIError:
    """The HTTP answer for an exception out of the engine: whose fault it is decides the status."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):  # invalid request, refused before anything was queued
        return APIError.invalid(e)
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineDeadError):
        return _dead_error()
    if isinstance(e, RequestFailedError):
        return APIError(500, f"the engine failed while processing this request ({e.reason}); other requests "
                             "were not affected", code="request_failed")
    return APIError(500, f"internal error: {type(e).__name__}", code="internal_error")


def _max_tokens(requested: int | None, prompt_len: int, max_model_len: int, param: str) -> int:
    room = max_model_len - prompt_len
    if requested is not None and requested < 1:
        raise APIError(400, f"{param}: must be at least 1, got {requested}", param)
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, your "
                            f"prompt has {prompt_len} tokens, leaving no room for a completion.", "messages")
    if requested is None:
        return room
    if requested > room:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                            f"for the completion). Please reduce the prompt or {param}.", param)
    return requested


async def _start(engine: AsyncLLMEngine, prompt: dict, params: Any, request_id: str,
                 cache_salt: str | None, lora: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
    """Start a request and wait for its first output, so bad input fails before any response is sent."""
    gen = engine.generate(prompt, params, request_id, cache_salt=cache_salt, lora_request=lora)
    try:
        first = await gen.__anext__()
    except Exception as e:
        raise _api_error_of(e) from e

    async def chained() -> AsyncIterator[RequestOutput]:
        try:
            yield first
            async for out in gen:
                yield out
        except APIError:
            raise
        except Exception as e:  # a failure after the first output: this request's, or the engine's
            raise _api_error_of(e) from e
        finally:
            await gen.aclose()  # aborts the request in the engine if it had not finished

    return chained()


def _token_ids(tok: Any, prompts: list[str | list[int]], param: str) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = tok.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, f"{param}: must not be empty", param)
        out.append(ids)
    return out


async def _start_all(engine: AsyncLLMEngine, prompts: list[list[int]], params_for: Callable[[list[int]], Any],
                     base_id: str, cache_salt: str | None,
                     lora: LoRARequest | None = None) -> list[AsyncIterator[RequestOutput]]:
    """One request per prompt (ids ``base_id-i``), each started (bad input fails here); if one fails to start, the
    ones already started are stopped."""
    streams: list[AsyncIterator[RequestOutput]] = []
    try:
        for i, ids in enumerate(prompts):
            streams.append(await _start(engine, {"prompt_token_ids": ids}, params_for(ids), f"{base_id}-{i}",
                                        cache_salt, lora))
    except BaseException:
        for s in streams:
            await s.aclose()  # type: ignore[attr-defined]
        raise
    return streams


async def _collect_all(streams: list[AsyncIterator[RequestOutput]], raw: Request) -> list[RequestOutput]:
    tasks = [asyncio.ensure_future(_collect(s, raw)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:  # one prompt failed: the response is an error, so stop computing the others
        for t in tasks:
            t.cancel()
        raise


async def _collect(stream: AsyncIterator[RequestOutput], raw: Request) -> RequestOutput:
    final = None
    try:
        async for out in stream:
            final = out
            if not out.finished and await raw.is_disconnected():
                raise APIError(499, "client disconnected")
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    assert final is not None
    return final


def _usage(out: RequestOutput) -> dict[str, Any]:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


def _token_text(tok: Any, token_id: int) -> str:
    return tok.decode([token_id])


def _chat_logprobs(tok: Any, token_ids: list[int], logprobs: list[LogprobDict], top_n: int) -> list[dict]:
    """OpenAI chat logprobs: each token's own log-probability plus the ``top_n`` most likely tokens."""
    content = []
    for token_id, lp in zip(token_ids, logprobs):
        text = _token_text(tok, token_id)
        top = sorted((e for e in lp.items() if e[1].rank is not None and e[1].rank <= top_n), key=lambda e: e[1].rank)
        content.append({
            "token": text, "logprob": lp[token_id].logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": _token_text(tok, t), "logprob": e.logprob,
                              "bytes": list(_token_text(tok, t).encode())} for t, e in top],
        })
    return content


def _completion_logprobs(tok: Any, out: RequestOutput, c: CompletionOutput, echo: bool) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = 0
    entries: list[tuple[int, LogprobDict | None]] = []
    if echo:
        entries += list(zip(out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids)))
    entries += list(zip(c.token_ids, c.logprobs or []))
    for token_id, lp in entries:
        text = _token_text(tok, token_id)
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
        token_lps.append(lp[token_id].logprob if lp else None)
        tops.append({_token_text(tok, t): e.logprob for t, e in lp.items()} if lp else None)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:  # an error after the stream started travels in the stream
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_chunks(stream: AsyncIterator[RequestOutput], request_id: str, model: str, include_usage: bool,
                       engine: AsyncLLMEngine, metrics: ServerMetrics, top_n: int,
                       parser: ChatOutputParser) -> AsyncIterator[dict]:
    created = int(time.time())
    tok = engine.get_tokenizer()
    choices_state: dict[int, ChoiceStream] = {}
    sent_tokens: dict[int, int] = {}
    done: set[int] = set()

    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        c = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
        if include_usage:
            c["usage"] = usage
        return c

    final = None
    async for out in stream:
        final = out
        choices = []
        for c in out.outputs:
            if c.index in done:
                continue
            if c.index not in choices_state:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
                choices_state[c.index], sent_tokens[c.index] = ChoiceStream(parser), 0
            delta = choices_state[c.index].delta(c.text, final=c.finish_reason is not None)
            new_ids = c.token_ids[sent_tokens[c.index]:]
            lp = None
            if c.logprobs is not None and new_ids:
                lp = {"content": _chat_logprobs(tok, new_ids, c.logprobs[sent_tokens[c.index]:], top_n)}
            sent_tokens[c.index] = len(c.token_ids)
            if c.finish_reason is not None:
                done.add(c.index)
            if delta or c.finish_reason is not None or lp:
                finish = parser.finish_reason(c.text, c.finish_reason)
                choices.append({"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish,
                                **({"stop_reason": c.stop_reason} if finish else {})})
        if choices:
            yield chunk(choices)
    if final is not None and final.finished:
        metrics.observe_finished(final)
        if include_usage:
            yield chunk([], _usage(final))


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they arrive."""
    queue: asyncio.Queue = asyncio.Queue()
    sentinel = object()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
        except Exception as e:  # handed to the consumer, which ends the whole response with it
            await queue.put((i, e))
        finally:
            await queue.put((i, sentinel))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is sentinel:
                remaining -= 1
                continue
            if isinstance(item, Exception):
                raise item
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()  # type: ignore[attr-defined]


async def _completion_chunks(streams: list[AsyncIterator[RequestOutput]], request_id: str, model: str, n: int,
                             echo: bool, include_usage: bool, engine: AsyncLLMEngine,
                             metrics: ServerMetrics) -> AsyncIterator[dict]:
    created = int(time.time())
    tok = engine.get_tokenizer()
    sent: dict[int, int] = {}
    finals: dict[int, RequestOutput] = {}

    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        c = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
        if include_usage:
            c["usage"] = usage
        return c

    async for i, out in _merge(streams):
        finals[i] = out
        choices = []
        for c in out.outputs:
            idx = i * n + c.index
            prefix = ""
            if idx not in sent:
                sent[idx] = 0
                if echo:
                    prefix = tok.decode(out.prompt_token_ids)
            delta = prefix + c.text[sent[idx]:]
            sent[idx] = len(c.text)
            if delta or c.finish_reason is not None:
                choices.append({"index": idx, "text": delta, "logprobs": None,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        if choices:
            yield chunk(choices)
        if out.finished:
            metrics.observe_finished(out)
    if include_usage and finals:
        prompt = sum(len(f.prompt_token_ids) for f in finals.values())
        completion = sum(len(c.token_ids) for f in finals.values() for c in f.outputs)
        yield chunk([], {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion})
