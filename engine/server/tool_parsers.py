"""Tool calls out of generated text: the formats behind vLLM's ``--tool-call-parser``, as pure functions.

A parser splits a model's output into the text meant for the user and the tool calls in it. One function serves the
whole response and the stream alike::

    parser.parse(text, final) -> Parsed(content, calls)

With ``final=False`` (``text`` is what has been generated so far) the result holds only what can no longer change:
content that cannot be the start of a tool call, and calls whose text is complete. The result for a prefix is always
a prefix of the result for the whole text (its content a prefix of the final content, its calls the first of the
final calls), so a stream that sends the difference between successive results sends exactly the non-streamed
answer. Tests hold every parser to that.

Formats (the text each model family is trained to write):

- ``hermes`` (Hermes 2/3, Qwen2.5, Qwen3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, repeated.
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``, or (tokenizer v11+)
  ``[TOOL_CALLS]name[ARGS]{...}`` per call.
- ``llama3_json`` (Llama 3.1-3.3): the output is ``{"name": ..., "parameters": {...}}`` objects separated by ``;``,
  optionally after ``<|python_tag|>``.
- ``pythonic`` (Llama 3.2/4, Gemma 3 with such a template): a Python list of calls, ``[f(a=1), g(b="x")]``.

A call whose text is not a call (bad JSON, no name) is left in the content, so nothing the model wrote is lost; an
output with no valid call is all content. Markers such as ``[TOOL_CALLS]`` are special tokens in some tokenizers: the
server detokenizes with special tokens kept whenever a parser reads the output.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Iterator

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the arguments object as JSON text (what OpenAI's ``function.arguments`` carries)


@dataclass(frozen=True)
class Parsed:
    content: str
    calls: tuple[ToolCall, ...] = ()


def call_from_json(obj: Any) -> ToolCall | None:
    """``{"name": str, "arguments" | "parameters": object}`` (the arguments may also be an object's JSON text, as
    some models write them) as a call; anything else is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def safe_length(text: str, markers: tuple[str, ...]) -> int:
    """How much of ``text`` cannot turn into one of ``markers`` as more text arrives: all of it but a tail that is
    the start of a marker."""
    for cut in range(max(0, len(text) - max(map(len, markers)) + 1), len(text)):
        tail = text[cut:]
        if any(m.startswith(tail) for m in markers):
            return cut
    return len(text)


def _settled(content: str, final: bool) -> str:
    """Trailing whitespace is held back until what follows it is known (``_with_calls`` drops it before calls)."""
    return content if final else content.rstrip()


def _without_marker(text: str, marker: str, final: bool) -> Parsed:
    """An output with no call marker yet: all content, but for a tail that may be the marker's start."""
    return Parsed(_settled(text if final else text[:safe_length(text, (marker,))], final))


def _opening(text: str, tag: str, final: bool) -> tuple[str, int] | None:
    """For formats whose calls open the output, optionally after ``tag``: the output from its first character
    after the tag (and whitespace), with that character's index; None while the output is too short to tell."""
    body = text.lstrip()
    if body.startswith(tag):
        body = body[len(tag):].lstrip()
    elif tag.startswith(body):
        body = ""
    if not body and not final:
        return None
    return body, len(text) - len(body)


def json_values(text: str, pos: int, separators: str) -> Iterator[tuple[Any, int]]:
    """Successive complete JSON values from ``pos``, each with where it ends, skipping whitespace and
    ``separators`` between them; stops at the first value that is incomplete or not JSON."""
    while True:
        pos = _skip(text, pos, separators)
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield value, pos


def _skip(text: str, pos: int, separators: str) -> int:
    while pos < len(text) and (text[pos].isspace() or text[pos] in separators):
        pos += 1
    return pos


def json_array_calls(text: str, pos: int) -> tuple[list[ToolCall], int, bool]:
    """The calls of a JSON array of call objects starting at ``text[pos] == "["``: the complete elements' calls
    (invalid elements skipped), where parsing stopped, and whether the array closed."""
    calls: list[ToolCall] = []
    stop = pos + 1
    for value, stop in json_values(text, stop, ","):
        call = call_from_json(value)
        if call is not None:
            calls.append(call)
    stop = _skip(text, stop, ",")
    if stop < len(text) and text[stop] == "]":
        return calls, stop + 1, True
    return calls, stop, False


class ToolParser:
    """Base: ``parse(text, final)`` as the module says; ``call_id()`` makes an id this format's chat templates
    accept back in a conversation (OpenAI's ``call_`` + 24 hex characters unless a format needs otherwise)."""

    name = ""

    def parse(self, text: str, final: bool) -> Parsed:
        raise NotImplementedError

    @staticmethod
    def call_id() -> str:
        return "call_" + secrets.token_hex(12)


class HermesParser(ToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> Parsed:
        first = text.find(self.START)
        if first < 0:
            return _without_marker(text, self.START, final)
        calls: list[ToolCall] = []
        rest: list[str] = []  # what is not a call, kept as content
        pos = first
        while pos < len(text):
            start = text.find(self.START, pos)
            if start < 0:
                if final and text[pos:].strip():
                    rest.append(text[pos:])
                break
            if final and text[pos:start].strip():
                rest.append(text[pos:start])
            end = text.find(self.END, start)
            if end < 0 and not final:
                break  # this call is still being written
            body_end = len(text) if end < 0 else end  # at the end an unclosed call still counts, as in vLLM
            block_end = len(text) if end < 0 else end + len(self.END)
            call = _json_call(text[start + len(self.START):body_end])
            if call is not None:
                calls.append(call)
            elif final:
                rest.append(text[start:block_end])
            pos = block_end
        return _with_calls(text, first, calls, rest, final)


class MistralParser(ToolParser):
    name = "mistral"
    MARKER = "[TOOL_CALLS]"
    _NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[CALL_ID\][A-Za-z0-9]+)?\[ARGS\]")

    @staticmethod
    def call_id() -> str:  # Mistral's templates refuse any id but 9 letters and digits
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    def parse(self, text: str, final: bool) -> Parsed:
        first = text.find(self.MARKER)
        if first < 0:
            return _without_marker(text, self.MARKER, final)
        calls: list[ToolCall] = []
        rest: list[str] = []
        for piece in text[first:].split(self.MARKER)[1:]:
            body = piece.lstrip()
            if body.startswith("["):  # [{"name": ..., "arguments": ...}, ...]
                found, stop, _ = json_array_calls(body, 0)
                calls += found
                leftover = body[stop:] if found else piece
            else:  # name[ARGS]{...}
                call, stop = self._named_call(piece)
                if call is not None:
                    calls.append(call)
                leftover = piece[stop:] if call is not None else piece
            if final and leftover.strip():
                rest.append(leftover)
        return _with_calls(text, first, calls, rest, final)

    def _named_call(self, piece: str) -> tuple[ToolCall | None, int]:
        named = self._NAMED.match(piece)
        if named is None:
            return None, 0
        try:
            args, stop = _DECODER.raw_decode(piece, named.end())
        except json.JSONDecodeError:
            return None, 0
        return call_from_json({"name": named.group(1), "arguments": args}), stop


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> Parsed:
        opening = _opening(text, self.TAG, final)
        if opening is None:
            return Parsed("")  # cannot tell yet whether this is a call
        body, start = opening
        if not body.startswith("{"):
            return Parsed(_settled(text, final))
        calls: list[ToolCall] = []
        stop = start
        for value, end in json_values(text, start, ";"):
            call = call_from_json(value)
            if call is None:
                break
            calls.append(call)
            stop = end
        rest = [text[stop:]] if final and text[stop:].strip(" \n;") else []
        return _with_calls(text, 0, calls, rest, final)


class PythonicParser(ToolParser):
    name = "pythonic"
    START, END = "<|python_start|>", "<|python_end|>"

    def parse(self, text: str, final: bool) -> Parsed:
        opening = _opening(text, self.START, final)
        if opening is None:
            return Parsed("")  # cannot tell yet whether this is a call
        body, start = opening
        if not body.startswith("["):
            return Parsed(_settled(text, final))
        found = _python_call_list(text, start)
        if found is None:
            return Parsed(text if final else "")
        calls, stop = found
        tail = text[stop:].strip()
        rest = [text[stop:]] if final and tail and tail != self.END else []
        return _with_calls(text, 0, calls, rest, final)


def _json_call(body: str) -> ToolCall | None:
    try:
        return call_from_json(json.loads(body))
    except json.JSONDecodeError:
        return None


def _with_calls(text: str, first: int, calls: list[ToolCall], rest: list[str], final: bool) -> Parsed:
    """The content before the first call, with what was not a call after it; with no call at all, the whole text
    (at the end) or the part before the first call's marker (until then)."""
    if not calls:
        return Parsed(text if final else text[:first].rstrip())
    return Parsed(text[:first].rstrip() + "".join(rest), tuple(calls))


def _python_call_list(text: str, start: int) -> tuple[list[ToolCall], int] | None:
    """The first ``]``-ending prefix of ``text[start:]`` that is a Python list of calls with literal keyword
    arguments, as calls and where it ends; None when there is none (yet)."""
    pos = start
    while True:
        close = text.find("]", pos)
        if close < 0:
            return None
        try:
            tree = ast.parse(text[start:close + 1], mode="eval").body
        except SyntaxError:
            pos = close + 1
            continue
        calls = _calls_of(tree)
        return (calls, close + 1) if calls is not None else None


def _calls_of(tree: ast.AST) -> list[ToolCall] | None:
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, (ast.Name, ast.Attribute)):
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
            arguments = json.dumps(args, ensure_ascii=False)
        except (ValueError, TypeError):
            return None
        calls.append(ToolCall(ast.unparse(node.func), arguments))
    return calls


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, MistralParser, Llama3JsonParser,
                                                            PythonicParser)}
