"""Serve with one fault injected, for the isolation tests: ``python fault_injection.py MODE [serve flags]``.

The faults are keyed on a marker at the start of the prompt's token ids, so only the request that carries it
meets them and every other request runs the real code:
- ``row``: the marked request's detokenizer raises on its fourth output token (per-request processing).
- ``forward``: any forward pass that includes the marked request raises (the engine loop itself fails).
"""

from __future__ import annotations

import sys

MARKER = [9, 9, 9, 8]


def _marked(token_ids: list[int]) -> bool:
    return list(token_ids[: len(MARKER)]) == MARKER


def inject(mode: str) -> None:
    if mode == "row":
        from flotilla.engine.detokenizer import IncrementalDetokenizer

        update = IncrementalDetokenizer.update
        context = len(MARKER) + 1  # the detokenizer keeps the prompt's last 5 tokens as context

        def failing_update(self, token_id, check_stop=True):
            if _marked(self.token_ids) and len(self.token_ids) >= context + 3:
                raise RuntimeError("injected fault in this request's detokenizer")
            return update(self, token_id, check_stop)

        IncrementalDetokenizer.update = failing_update
    elif mode == "forward":
        from flotilla.engine.model_runner import ModelRunner

        execute = ModelRunner.execute

        def failing_execute(self, sched):
            if any(_marked(s.request.prompt_token_ids) for s in sched.scheduled):
                raise RuntimeError("injected fault in the forward pass")
            return execute(self, sched)

        ModelRunner.execute = failing_execute
    else:
        raise SystemExit(f"unknown fault mode {mode!r}")


if __name__ == "__main__":
    inject(sys.argv[1])
    from flotilla.engine.cli import main

    sys.exit(main(["serve", *sys.argv[2:]]))
