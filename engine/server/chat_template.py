"""Chat-template rendering off the event loop, under a time limit.

A Jinja template is a program: a loop nested in a loop, in the server's own template fed a hostile
``chat_template_kwargs`` or in a request-supplied template, can run for minutes. Rendering therefore runs in
a worker thread (the event loop keeps answering probes) and under a deadline enforced from inside that thread:
a trace function, installed for the render alone, raises once the deadline has passed, so a runaway render
stops instead of holding a thread forever. Jinja compiles templates to Python, so the trace sees every step.
"""

from __future__ import annotations

import asyncio
import sys
import time
from types import FrameType
from typing import Any, Callable

from flotilla.engine.server.protocol import APIError


class TemplateTimeout(Exception):
    pass


def _deadline_tracer(deadline: float) -> Callable:
    def tracer(frame: FrameType, event: str, arg: Any) -> Callable:
        if time.monotonic() > deadline:
            raise TemplateTimeout()
        return tracer

    return tracer


def render_with_deadline(render: Callable[[], Any], timeout: float) -> Any:
    """Run ``render()`` in this thread; raise ``TemplateTimeout`` once it has run ``timeout`` seconds."""
    previous = sys.gettrace()
    sys.settrace(_deadline_tracer(time.monotonic() + timeout))
    try:
        return render()
    finally:
        sys.settrace(previous)


async def apply_chat_template(tokenizer: Any, messages: list[dict], *, template: str | None,
                              add_generation_prompt: bool, continue_final_message: bool,
                              kwargs: dict | None, timeout: float, tools: list[dict] | None = None) -> list[int]:
    """Token ids of ``messages`` under the chat template; a template error or overrun is the request's
    fault (HTTP 400 naming ``messages``)."""

    def render() -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, tools=tools,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message, **(kwargs or {}))

    try:
        text = await asyncio.to_thread(render_with_deadline, render, timeout)
    except TemplateTimeout as e:
        raise APIError(400, f"messages: rendering the chat template took over {timeout:g} s", "messages",
                       code="chat_template_timeout") from e
    except APIError:
        raise
    except Exception as e:  # template errors are the request's fault (bad roles, missing fields)
        raise APIError(400, f"messages: chat template failed: {e}", "messages") from e
    # Tokenized here, on the event loop's thread, as every other prompt is: a fast tokenizer used from two
    # threads at once can fail ("Already borrowed"). The template writes its own special tokens.
    return tokenizer.encode(text, add_special_tokens=False)
