"""The routing key of a request: the start of its prompt, as text, so that requests sharing a prefix (a tenant's
system prompt, the earlier turns of a conversation) hash to the same replica, whose prefix cache holds it."""

from __future__ import annotations

import json
from typing import Any


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: the text ones; an image part counts by its URL
        parts = []
        for part in content:
            if isinstance(part, dict):
                parts.append(str(part.get("text") or (part.get("image_url") or {}).get("url") or ""))
        return "".join(parts)
    return "" if content is None else json.dumps(content, sort_keys=True)


def prompt_text(body: dict[str, Any]) -> str:
    """The request's prompt, flattened: chat messages as ``role: content`` lines in order, a completion's prompt
    (text, token ids, or the first of a batch) as it is, an embeddings input likewise."""
    if isinstance(body.get("messages"), list):
        return "\n".join(f"{m.get('role', '')}: {_content_text(m.get('content'))}"
                         for m in body["messages"] if isinstance(m, dict))
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch: its first prompt (batches are rare behind a router; one choice for all)
    if isinstance(prompt, list):
        return " ".join(str(t) for t in prompt)
    return prompt if isinstance(prompt, str) else ""


def prefix_key(body: dict[str, Any], chars: int) -> str:
    """The first ``chars`` characters of the prompt ("" when there is none: the balancer then picks by load).
    Short enough that the turns of one conversation and the chats of one system prompt share it, long enough that
    different system prompts differ."""
    return prompt_text(body)[:chars]
