"""OpenAI request shapes (plus vLLM's extra sampling fields) and their mapping to ``SamplingParams``.

Validation happens here, so every bad field surfaces as HTTP 400 in OpenAI's error shape with the
field's name in ``param``.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from flotilla.engine.sampling_params import SamplingParams
from flotilla.engine.server.chat_output import required_schema
from flotilla.engine.structured_output import GuidedDecodingParams


class APIError(Exception):
    """An error with an HTTP status, rendered as ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 503: "service_unavailable_error", 500: "internal_server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @classmethod
    def invalid(cls, e: ValueError) -> "APIError":
        """A 400 for the engine's ``ValueError``, whose message starts with the field it names."""
        message = str(e)
        head = message.split(":", 1)[0]
        return cls(400, message, head if head.isidentifier() else None)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code if self.code is not None else self.status}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints. Unknown fields are accepted and ignored, as OpenAI clients send
    more than any server implements (``user``, ``service_tier``...)."""

    # NaN and infinity parse from JSON (Python's reader takes them) but are never a valid setting.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    n: int = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra body fields
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    cache_salt: str | None = None
    # Structured output: OpenAI's response_format, vLLM's guided_* fields and their newer structured_outputs object.
    response_format: dict[str, Any] | None = None
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: dict[str, Any] | None = None

    def guided_decoding(self) -> GuidedDecodingParams | None:
        """The request's grammar, from whichever one field gives it; each error names that field."""
        given = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, name) is not None]
        if self.structured_outputs is not None:
            given.append("structured_outputs")
        if self.response_format is not None and self.response_format.get("type") != "text":
            given.append("response_format")
        if len(given) > 1:
            raise APIError(400, f"{given[1]}: cannot be combined with {given[0]}; give one kind of structured "
                                "output", given[1])
        if not given:
            return None
        origin = given[0]
        extra = dict(backend=self.guided_decoding_backend, whitespace_pattern=self.guided_whitespace_pattern)
        try:
            if origin == "response_format":
                return _response_format(self.response_format, extra)  # type: ignore[arg-type]
            if origin == "structured_outputs":
                unknown = sorted(set(self.structured_outputs) - _STRUCTURED_FIELDS)  # type: ignore[arg-type]
                if unknown:
                    raise APIError(400, f"structured_outputs: unknown field(s) {', '.join(unknown)}",
                                   "structured_outputs")
                return GuidedDecodingParams(**self.structured_outputs, _origin=origin)  # type: ignore[arg-type]
            return GuidedDecodingParams(**{origin.removeprefix("guided_"): getattr(self, origin)}, **extra,
                                        _origin=origin)
        except ValueError as e:
            raise APIError.invalid(e) from e

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
                        detokenize: bool = True, keep_special_tokens: bool = False) -> SamplingParams:
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError as e:
                raise APIError(400, "logit_bias: keys must be token ids", "logit_bias") from e
        fields = dict(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            min_p=self.min_p or 0.0, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty or 1.0, logit_bias=bias, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens and not keep_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, detokenize=detokenize,
            allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
            guided_decoding=self.guided_decoding(),
        )
        try:
            return SamplingParams(**fields)
        except ValueError as e:
            raise APIError.invalid(e) from e


_STRUCTURED_FIELDS = {"json", "regex", "choice", "grammar", "json_object", "backend", "whitespace_pattern",
                      "disable_any_whitespace", "disable_additional_properties", "disable_fallback"}


def _response_format(fmt: dict[str, Any], extra: dict[str, Any]) -> GuidedDecodingParams:
    """OpenAI's ``response_format``: ``json_object`` (any JSON object) or ``json_schema`` (``{"name", "schema",
    "strict"}``; a schema is enforced whether or not ``strict`` is set, as vLLM does)."""
    kind = fmt.get("type")
    if kind == "json_object":
        return GuidedDecodingParams(json_object=True, **extra, _origin="response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("response_format: json_schema must be an object with a schema")
        # OpenAI's field is schema; vLLM's request model names it json_schema (schema its alias): read either.
        schema = spec.get("schema", spec.get("json_schema"))
        if schema is None:
            return GuidedDecodingParams(json_object=True, **extra, _origin="response_format")
        if not isinstance(schema, dict):
            raise ValueError("response_format: json_schema.schema must be an object")
        return GuidedDecodingParams(json=schema, **extra, _origin="response_format")
    raise ValueError(f"response_format: type must be text, json_object or json_schema, got {kind!r}")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: which call this is the result of

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for p in self.content:
            if p.type != "text":
                raise APIError(400, f"content part type {p.type!r} is not supported (text only)", "messages")
            parts.append(p.text or "")
        return "".join(parts)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: tool-call arguments as objects (templates render them with
        ``tojson``), not the JSON text the API carries."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                try:
                    args = json.loads(c.function.arguments) if c.function.arguments.strip() else {}
                except json.JSONDecodeError as e:
                    raise APIError(400, f"messages: tool call {c.id} has arguments that are not JSON: {e}",
                                   "messages") from e
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                                           "arguments": args}})
            out["tool_calls"] = calls
        return out


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise APIError(400, "top_logprobs: must be between 0 and 20", "top_logprobs")
        if not self.logprobs:
            if self.top_logprobs:
                raise APIError(400, "top_logprobs: requires logprobs to be true", "top_logprobs")
            return None
        return self.top_logprobs or 0

    def tool_choice_mode(self) -> str:
        """``none``, ``auto``, ``required`` or ``named``, as OpenAI defaults it: ``auto`` when tools are given."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        if self.tool_choice != "none" and not self.tools:
            raise APIError(400, f"tool_choice: {self.tool_choice!r} needs tools", "tool_choice")
        return self.tool_choice

    def named_tool(self) -> FunctionDefinition | None:
        if not isinstance(self.tool_choice, NamedToolChoice):
            return None
        wanted = self.tool_choice.function.name
        for tool in self.tools or ():
            if tool.function.name == wanted:
                return tool.function
        raise APIError(400, f"tool_choice: names the function {wanted!r}, which is not among the request's tools",
                       "tool_choice")

    def guided_decoding(self) -> GuidedDecodingParams | None:
        """The response format's grammar, or the one ``tool_choice`` imposes: a named tool's arguments, or for
        ``required`` a list of calls (``chat_output.required_schema``). One of the two, never both."""
        mode = self.tool_choice_mode()
        if mode not in ("named", "required"):
            return super().guided_decoding()
        if super().guided_decoding() is not None:
            raise APIError(400, f"tool_choice: {mode} tool choice cannot be combined with response_format or "
                                "guided decoding", "tool_choice")
        named = self.named_tool()
        if named is not None:
            schema = named.parameters or {"type": "object"}
        else:
            schema = required_schema([t.function.model_dump() for t in self.tools or ()],
                                     self.parallel_tool_calls is not False)
        try:
            # Arguments are for a program, not a reader: compact JSON, which also keeps a small model from padding
            # every gap with newlines up to the whitespace cap (SmolLM2 did, until max_tokens).
            return GuidedDecodingParams(json=schema, disable_any_whitespace=True, _origin="tools")
        except ValueError as e:
            raise APIError.invalid(e) from e


def prompt_list(value: Union[str, list[str], list[int], list[list[int]]], param: str) -> list[Union[str, list[int]]]:
    """OpenAI's prompt forms (one text, texts, one list of token ids, lists of them) as a list of prompts."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError(400, f"{param}: must not be empty", param)
    if all(isinstance(x, int) for x in value):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[Union[str, list[int]]]:
        return prompt_list(self.prompt, "prompt")


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, plus vLLM's ``normalize``."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None
    normalize: bool | None = None

    def inputs(self) -> list[Union[str, list[int]]]:
        return prompt_list(self.input, "input")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body: the adapter's name (what clients send as ``model``) and its path (a
    folder, a Hugging Face repo id, or s3://)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = ""
    lora_path: str = ""


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_int_id: int | None = None
