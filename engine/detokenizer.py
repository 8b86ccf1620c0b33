"""Incremental detokenization with stop strings.

Decoding each new token alone breaks multi-byte characters and drops the leading spaces that
SentencePiece/BPE tokenizers encode in the *next* token. So each step decodes a short window (a few
tokens of context before the new ones) and emits only the text that became final; a window that ends
in U+FFFD (half a character) waits for the next token. Stop strings are searched in the text and
trimmed; while a request runs, text that could be the start of a stop string is held back.
"""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str], include_stop: bool,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.stop = stop
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._holdback = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, token_id: int, check_stop: bool = True) -> str | None:
        """Add one token. Returns the stop string that matched (text already trimmed), else None."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        start = max(len(self.text) - self._holdback, 0)
        self.text += delta
        if not (check_stop and self.stop):
            return None
        matches = [(idx, stop) for stop in self.stop if (idx := self.text.find(stop, start)) != -1]
        if not matches:
            return None
        idx, stop = min(matches)  # the earliest stop string in the text wins
        self.text = self.text[: idx + len(stop)] if self.include_stop else self.text[:idx]
        return stop

    def visible_text(self, finished: bool) -> str:
        """Text safe to show: while running, a tail that might begin a stop string is withheld."""
        if finished or not self.stop or not self._holdback:
            return self.text
        return self.text[: max(len(self.text) - self._holdback, 0)]
