"""Tool-call and reasoning parsers (engine/server/tool_parsers.py, reasoning.py, chat_output.py).

The oracle is each model family's own format: the texts below are written as those models write tool calls (the
assistant turns their chat templates render), and each must come back as the calls in it. Then a property that ties
streaming to the full answer: for every way of cutting an output into pieces, the deltas the stream sends add up to
exactly the non-streamed message (content, reasoning, every call's name and arguments).
"""

from __future__ import annotations

import json
import random

import pytest

from flotilla.engine.server.chat_output import ChatOutputParser, ChoiceStream, required_schema
from flotilla.engine.server.reasoning import DeepSeekR1Parser, Qwen3Parser
from flotilla.engine.server.tool_parsers import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    PythonicParser,
)

WEATHER = {"city": "Paris", "unit": "celsius"}
NESTED = {"query": "café \"au lait\"", "filters": {"tags": ["a", "b"], "limit": 3}, "exact": False, "score": None}


def calls(*pairs):
    return [(name, args) for name, args in pairs]


def parsed_calls(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


# (parser, model output, expected content, expected calls)
CASES = [
    # Hermes / Qwen2.5 / Qwen3
    (HermesParser, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
                   '</tool_call>', "", calls(("get_weather", WEATHER))),
    (HermesParser, 'Let me look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                   '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "search", "arguments": '
                   + json.dumps(NESTED) + '}\n</tool_call>',
     "Let me look both up.", calls(("get_weather", WEATHER), ("search", NESTED))),
    (HermesParser, '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": '
                   '\\"celsius\\"}"}</tool_call>', "", calls(("get_weather", WEATHER))),  # arguments as JSON text
    (HermesParser, '<tool_call>\n{"name": "noop", "arguments": {}}\n', "", calls(("noop", {}))),  # cut before </..>
    (HermesParser, "<tool_call>{not json}</tool_call>\n<tool_call>{\"name\": \"noop\", \"arguments\": {}}"
                   "</tool_call>", "<tool_call>{not json}</tool_call>", calls(("noop", {}))),
    (HermesParser, "<tool_call>{oops</tool_call> and nothing else", "<tool_call>{oops</tool_call> and nothing else",
     []),
    (HermesParser, "The answer is 42.\n", "The answer is 42.\n", []),
    # Mistral: the array after [TOOL_CALLS], and v11+'s name[ARGS]{...}
    (MistralParser, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                    '{"name": "search", "arguments": ' + json.dumps(NESTED) + '}]',
     "", calls(("get_weather", WEATHER), ("search", NESTED))),
    (MistralParser, 'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
                    '[TOOL_CALLS]search[CALL_ID]a1b2c3d4e[ARGS]' + json.dumps(NESTED),
     "Checking.", calls(("get_weather", WEATHER), ("search", NESTED))),
    (MistralParser, "[TOOL_CALLS] [{\"nam", "[TOOL_CALLS] [{\"nam", []),
    (MistralParser, "No tools needed.", "No tools needed.", []),
    # Llama 3.1-3.3 JSON
    (Llama3JsonParser, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     "", calls(("get_weather", WEATHER))),
    (Llama3JsonParser, '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                       '{"name": "search", "parameters": ' + json.dumps(NESTED) + '}',
     "", calls(("get_weather", WEATHER), ("search", NESTED))),
    (Llama3JsonParser, '{"answer": 42}', '{"answer": 42}', []),
    (Llama3JsonParser, "Paris is sunny.", "Paris is sunny.", []),
    # Pythonic (Llama 3.2/4)
    (PythonicParser, '[get_weather(city="Paris", unit="celsius"), search(query=\'café "au lait"\', '
                     'filters={"tags": ["a", "b"], "limit": 3}, exact=False, score=None)]',
     "", calls(("get_weather", WEATHER), ("search", NESTED))),
    (PythonicParser, '<|python_start|>[get_weather(city="Paris", unit="celsius")]<|python_end|>',
     "", calls(("get_weather", WEATHER))),
    (PythonicParser, '<|python_start|>\n[get_weather(city="Paris", unit="celsius")]', "",
     calls(("get_weather", WEATHER))),  # whitespace after the tag: still no content while it streams
    (PythonicParser, "[1, 2, 3]", "[1, 2, 3]", []),
    (PythonicParser, "It is sunny in Paris.", "It is sunny in Paris.", []),
]


@pytest.mark.parametrize("parser, text, content, expected", CASES)
def test_each_format_gives_back_the_calls_its_models_write(parser, text, content, expected):
    parsed = parser().parse(text, final=True)
    assert parsed.content == content
    assert parsed_calls(parsed) == expected
    for c in parsed.calls:  # OpenAI's arguments: the JSON text of an object
        assert isinstance(json.loads(c.arguments), dict)


def cuts(text: str, rng: random.Random) -> list[list[str]]:
    """Ways to deliver ``text`` as a stream: character by character, and in random token-sized pieces."""
    ways = [list(text)]
    for _ in range(5):
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 6)
            pieces.append(text[i:i + n])
            i += n
        ways.append(pieces)
    return ways


def streamed(parser: ChatOutputParser, pieces: list[str]) -> dict:
    """What a client assembles from the stream's deltas (as the openai SDK accumulates them)."""
    state = ChoiceStream(parser)
    text, content, reasoning, tool_calls = "", "", "", {}
    for k, piece in enumerate(pieces):
        text += piece
        delta = state.delta(text, final=k == len(pieces) - 1)
        content += delta.get("content", "")
        reasoning += delta.get("reasoning_content", "")
        for tc in delta.get("tool_calls", ()):
            call = tool_calls.setdefault(tc["index"], {"name": "", "arguments": ""})
            if "id" in tc:
                assert tc["type"] == "function" and tc["id"] and call["name"] == ""
                call["name"] = tc["function"]["name"]
            call["arguments"] += tc["function"]["arguments"]
    return {"content": content, "reasoning": reasoning,
            "calls": [(c["name"], c["arguments"]) for _, c in sorted(tool_calls.items())]}


def whole(parser: ChatOutputParser, text: str) -> dict:
    message = parser.message(text)
    return {"content": message["content"] or "", "reasoning": message.get("reasoning_content") or "",
            "calls": [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", ())]}


@pytest.mark.parametrize("parser, text, content, expected", CASES)
def test_the_stream_adds_up_to_the_whole_answer_however_the_text_arrives(parser, text, content, expected):
    chat = ChatOutputParser(tools=parser())
    want = whole(chat, text)
    for pieces in cuts(text, random.Random(text)):
        assert streamed(chat, pieces) == want, pieces


REASONING = [
    (DeepSeekR1Parser, "<think>\nThe user wants a city.\n</think>\n\nParis.", "\nThe user wants a city.\n",
     "\n\nParis."),
    (DeepSeekR1Parser, "The template opened the thinking.</think>Paris.", "The template opened the thinking.",
     "Paris."),
    (DeepSeekR1Parser, "<think>Still thinking when the tokens ran o", "Still thinking when the tokens ran o", ""),
    (Qwen3Parser, "<think>\nCapital of France.\n</think>\n\nParis.", "\nCapital of France.\n", "\n\nParis."),
    (Qwen3Parser, "Paris.", "", "Paris."),  # enable_thinking=False: no thinking at all
    (Qwen3Parser, "<thin", "", "<thin"),
]


@pytest.mark.parametrize("parser, text, reasoning, content", REASONING)
def test_reasoning_is_split_from_the_answer(parser, text, reasoning, content):
    assert parser().split(text, final=True) == (reasoning, content)
    chat = ChatOutputParser(reasoning=parser())
    for pieces in cuts(text, random.Random(text)):
        got = streamed(chat, pieces)
        assert (got["reasoning"], got["content"]) == (reasoning, content), pieces


def test_reasoning_then_tool_calls_in_one_output():
    text = ('<think>\nI need the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris", "unit": "celsius"}}\n</tool_call>')
    chat = ChatOutputParser(reasoning=Qwen3Parser(), tools=HermesParser())
    message = chat.message(text)
    assert message["reasoning_content"] == "\nI need the weather.\n"
    assert message["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == \
        [("get_weather", WEATHER)]
    assert chat.finish_reason(text, "stop") == "tool_calls"
    assert chat.finish_reason(text, "length") == "length"
    for pieces in cuts(text, random.Random(1)):
        assert streamed(chat, pieces) == whole(chat, text)


def test_a_named_tool_streams_its_arguments_as_they_are_generated():
    text = json.dumps(NESTED)
    chat = ChatOutputParser(named="search")
    assert whole(chat, text) == {"content": "", "reasoning": "", "calls": [("search", text)]}
    assert chat.finish_reason(text, "stop") == "stop"  # as OpenAI ends a forced function call
    state = ChoiceStream(chat)
    first = state.delta(text[:5], final=False)
    assert first["tool_calls"][0]["function"] == {"name": "search", "arguments": text[:5]}
    assert state.delta(text[:9], final=False)["tool_calls"] == [{"index": 0, "function": {"arguments": text[5:9]}}]


def test_required_reads_the_list_its_grammar_allows():
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
             {"name": "search"}]
    schema = required_schema(tools, parallel=False)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    assert [i["properties"]["name"]["enum"] for i in schema["items"]["anyOf"]] == [["get_weather"], ["search"]]
    assert "maxItems" not in required_schema(tools, parallel=True)
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "search", "parameters": {}}]'
    chat = ChatOutputParser(required=True)
    assert whole(chat, text)["calls"] == [("get_weather", '{"city": "Paris"}'), ("search", "{}")]
    assert chat.finish_reason(text, "stop") == "tool_calls"
    for pieces in cuts(text, random.Random(2)):
        assert streamed(chat, pieces) == whole(chat, text)
    cut = '[{"name": "get_weather", "parameters": {"ci'  # max_tokens hit mid-call: nothing is lost
    assert whole(chat, cut) == {"content": cut, "reasoning": "", "calls": []}


def test_mistral_ids_are_the_nine_characters_its_templates_accept():
    chat = ChatOutputParser(tools=MistralParser())
    ids = {chat.message('[TOOL_CALLS]noop[ARGS]{}')["tool_calls"][0]["id"] for _ in range(20)}
    assert len(ids) == 20 and all(len(i) == 9 and i.isalnum() for i in ids)
    other = ChatOutputParser(tools=HermesParser()).message('<tool_call>{"name": "noop"}</tool_call>')
    assert other["tool_calls"][0]["id"].startswith("call_")
