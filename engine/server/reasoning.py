"""Reasoning out of generated text: vLLM's ``--reasoning-parser``, as pure functions.

Reasoning models think between ``<think>`` and ``</think>`` before they answer. A parser splits the output into the
thinking (``reasoning_content`` in the response) and the answer (``content``, which a tool parser may read next)::

    parser.split(text, final) -> (reasoning, content)

As with the tool parsers, the split of a prefix (``final=False``) holds only what can no longer change, and is a
prefix of the split of the whole, so the stream sends exactly the non-streamed answer.

- ``deepseek_r1`` (DeepSeek-R1 and its distills, QwQ, Qwen3 thinking-2507): the chat template opens ``<think>`` in the
  prompt, so the output may start inside the thinking; everything before ``</think>`` is reasoning, and an output
  that never closes it is all reasoning (it ran out of tokens while thinking).
- ``qwen3`` (Qwen3 hybrid models): the output thinks only when it starts with ``<think>`` (``enable_thinking`` in
  ``chat_template_kwargs`` decides); an output that does not is all answer.
"""

from __future__ import annotations

from flotilla.engine.server.tool_parsers import safe_length

START, END = "<think>", "</think>"


class ReasoningParser:
    name = ""

    def split(self, text: str, final: bool) -> tuple[str, str]:
        raise NotImplementedError


def _thinking(text: str, final: bool) -> tuple[str, str]:
    """``text`` starts inside the thinking (any ``<think>`` already stripped)."""
    end = text.find(END)
    if end >= 0:
        return text[:end], text[end + len(END):]
    return (text if final else text[:safe_length(text, (END,))]), ""


class DeepSeekR1Parser(ReasoningParser):
    name = "deepseek_r1"

    def split(self, text: str, final: bool) -> tuple[str, str]:
        if not final and START.startswith(text):
            return "", ""  # perhaps an opening tag
        return _thinking(text[len(START):] if text.startswith(START) else text, final)


class Qwen3Parser(ReasoningParser):
    name = "qwen3"

    def split(self, text: str, final: bool) -> tuple[str, str]:
        body = text.lstrip()
        if not final and START.startswith(body):
            return "", ""  # perhaps an opening tag
        if not body.startswith(START):
            return "", text
        return _thinking(body[len(START):], final)


PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (DeepSeekR1Parser, Qwen3Parser)}
