"""Incremental detokenization never splits a character and reproduces tokenizer.decode()."""

from __future__ import annotations

from flotilla.engine.detokenizer import IncrementalDetokenizer

TEXT = "Hello wörld — naïve café 你好世界 🙂👍 end"


def test_incremental_text_equals_full_decode_and_never_shows_half_characters(tokenizer):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(TEXT)
    detok = IncrementalDetokenizer(tokenizer, prompt, stop=[], include_stop=False)
    seen = []
    for t in ids:
        detok.update(t)
        seen.append(detok.text)
        assert "\ufffd" not in detok.text
    assert detok.text == tokenizer.decode(ids)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # text only ever grows


def test_stop_string_spanning_tokens_is_found_and_trimmed(tokenizer):
    ids = tokenizer.encode(TEXT)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["café 你"], include_stop=False)
    hit = None
    for t in ids:
        hit = detok.update(t)
        if hit:
            break
    assert hit == "café 你"
    assert detok.text == TEXT[: TEXT.index("café 你")]


def test_text_that_may_start_a_stop_string_is_held_back_while_running(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["XYZ"], include_stop=False)
    for t in tokenizer.encode("abc XY"):
        detok.update(t)
    assert detok.text == "abc XY"
    assert detok.visible_text(finished=False) == "abc "
    assert detok.visible_text(finished=True) == "abc XY"
