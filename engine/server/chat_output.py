"""What the chat endpoint makes of one choice's generated text: reasoning, the answer, tool calls.

``ChatOutputParser`` composes the pure parsers, in order: the reasoning parser (``--reasoning-parser``) splits off the
thinking, then the tool step reads the answer, in one of three ways:

- ``auto`` (``--enable-auto-tool-choice --tool-call-parser P``): parser P finds the calls the model chose to make;
- ``required``: the output was constrained to a JSON list of ``{"name", "parameters"}`` (see ``required_schema``);
- a named tool: the output was constrained to that tool's arguments, so all of it is the one call's arguments.

``parse(text, final)`` keeps the parsers' promise (the result for a prefix is a prefix of the whole's), so
``ChoiceStream`` sends as deltas exactly what the non-streamed message holds. The named tool's arguments are the one
thing that grows in place: they stream as they are generated, as OpenAI's do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flotilla.engine.server.reasoning import ReasoningParser
from flotilla.engine.server.tool_parsers import Parsed, ToolCall, ToolParser, json_array_calls


@dataclass(frozen=True)
class ChatOutput:
    content: str
    reasoning: str | None = None  # None: no reasoning parser
    calls: tuple[ToolCall, ...] = ()


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema ``tool_choice: "required"`` constrains the output to: a list of one call or more (one when
    ``parallel_tool_calls`` is false), each ``{"name": one of the tools, "parameters": that tool's arguments}``."""
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t["name"]]},
                             "parameters": t.get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"]} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


@dataclass
class ChatOutputParser:
    reasoning: ReasoningParser | None = None
    tools: ToolParser | None = None  # auto tool choice
    named: str | None = None  # tool_choice naming one function
    required: bool = False  # tool_choice "required"

    def parse(self, text: str, final: bool) -> ChatOutput:
        reasoning = None
        if self.reasoning is not None:
            reasoning, text = self.reasoning.split(text, final)
        if self.named is not None:
            calls = (ToolCall(self.named, text),) if text else ()
            return ChatOutput("", reasoning, calls)
        if self.required:
            found, _, _ = json_array_calls(text, text.find("[")) if "[" in text else ([], 0, False)
            parsed = Parsed("" if found or not final else text, tuple(found))
        elif self.tools is not None:
            parsed = self.tools.parse(text, final)
        else:
            parsed = Parsed(text)
        return ChatOutput(parsed.content, reasoning, parsed.calls)

    def call_id(self) -> str:
        return (self.tools or ToolParser).call_id()

    def message(self, text: str) -> dict[str, Any]:
        """The non-streamed ``message`` for one choice's whole text."""
        out = self.parse(text, final=True)
        msg: dict[str, Any] = {"role": "assistant", "content": None if out.calls and not out.content else out.content}
        if self.reasoning is not None:
            msg["reasoning_content"] = out.reasoning or None
        if self.tools is not None or self.named is not None or self.required:
            msg["tool_calls"] = [_call(self.call_id(), c) for c in out.calls]
        return msg

    def finish_reason(self, text: str, reason: str | None) -> str | None:
        """OpenAI's ``tool_calls`` when the model stopped after calling tools (auto or required); a named tool's
        call ends as ``stop``, and a cut-off output keeps ``length``."""
        if reason == "stop" and (self.tools is not None or self.required) and self.parse(text, True).calls:
            return "tool_calls"
        return reason


def _call(call_id: str, c: ToolCall) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


@dataclass
class ChoiceStream:
    """One choice of a streamed response: the delta fields to send for its text so far."""

    parser: ChatOutputParser
    sent_reasoning: int = 0
    sent_content: int = 0
    sent_args: list[int] = field(default_factory=list)  # per announced call, how much of its arguments went out

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        out = self.parser.parse(text, final)
        delta: dict[str, Any] = {}
        if out.reasoning is not None and len(out.reasoning) > self.sent_reasoning:
            delta["reasoning_content"] = out.reasoning[self.sent_reasoning:]
            self.sent_reasoning = len(out.reasoning)
        if len(out.content) > self.sent_content:
            delta["content"] = out.content[self.sent_content:]
            self.sent_content = len(out.content)
        calls = []
        for i, c in enumerate(out.calls):
            if i == len(self.sent_args):
                calls.append({"index": i, **_call(self.parser.call_id(), c)})
                self.sent_args.append(len(c.arguments))
            elif len(c.arguments) > self.sent_args[i]:
                calls.append({"index": i, "function": {"arguments": c.arguments[self.sent_args[i]:]}})
                self.sent_args[i] = len(c.arguments)
        if calls:
            delta["tool_calls"] = calls
        return delta
