"""Tool calling and reasoning through the real server, driven by the official openai SDK.

``tool_choice="required"`` and a named tool are enforced by a grammar, so the bundled SmolLM2 (which was never taught
tools) must still give arguments that validate against each tool's schema: the SDK's ``parse()`` checks them with
the tool's own Pydantic model. ``auto`` goes through the server's ``--tool-call-parser``: the model's output is forced
into Hermes' format with a regex (SmolLM2 would not write it on its own), and the calls must come back parsed.
The SDK's stream helper, which assembles tool-call deltas as OpenAI clients do, must give the non-streamed answer.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from server_process import sdk_client, serving

pytest.importorskip("xgrammar")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY = "sk-test-tools"


@pytest.fixture(scope="module")
def server():
    with serving(["--max-model-len", "1024", "--dtype", "float32", "--max-num-seqs", "32",
                  "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "deepseek_r1"],
                 KEY) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return sdk_client(server, KEY)


class GetWeather(BaseModel):
    """The current weather in a city."""
    city: str = Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]


class BookFlight(BaseModel):
    """Book a flight between two airports."""
    origin: str = Field(pattern=r"^[A-Z]{3}$")
    destination: str = Field(pattern=r"^[A-Z]{3}$")
    passengers: int = Field(ge=1, le=9)


class CreateEvent(BaseModel):
    """Put an event in the calendar."""
    title: str = Field(max_length=30)
    attendees: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)
    all_day: bool


TOOLS = [openai.pydantic_function_tool(m) for m in (GetWeather, BookFlight, CreateEvent)]
MODELS = {"GetWeather": GetWeather, "BookFlight": BookFlight, "CreateEvent": CreateEvent}
PROMPTS = [
    "What's the weather like in Lisbon today?",
    "I need two seats from Boston to Denver next Friday.",
    "Add lunch with Ana and Ben to my calendar for tomorrow.",
    "Is it going to be cold in Oslo? Use fahrenheit.",
    "Fly me from JFK to LAX, just me.",
    "Schedule the team offsite, all day, with Kim.",
]


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "You call tools to help the user."}, {"role": "user", "content": text}]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_named_tool_always_gets_arguments_that_validate(client, prompt):
    for name, model in MODELS.items():
        done = client.chat.completions.parse(
            model=MODEL, messages=chat(prompt), tools=TOOLS, max_tokens=200, temperature=1.0, seed=7,
            tool_choice={"type": "function", "function": {"name": name}})
        choice = done.choices[0]
        assert choice.finish_reason == "stop", choice
        (call,) = choice.message.tool_calls
        assert call.function.name == name and call.id
        assert isinstance(call.function.parsed_arguments, model)  # the SDK validated them with the model


@pytest.mark.parametrize("prompt", PROMPTS)
def test_required_always_calls_a_tool_with_arguments_that_validate(client, prompt):
    # One call per turn: with parallel calls allowed, SmolLM2 at temperature 0 can go on adding calls until
    # max_tokens (the grammar, like vLLM's, sets no upper bound); the parallel list is exercised below.
    for temperature in (0.0, 1.0):
        done = client.chat.completions.parse(
            model=MODEL, messages=chat(prompt), tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            max_tokens=300, temperature=temperature, seed=3)
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert isinstance(call.function.parsed_arguments, MODELS[call.function.name])


def streamed_and_not(client, **request):
    whole = client.chat.completions.create(model=MODEL, temperature=0, **request)
    with client.chat.completions.stream(model=MODEL, temperature=0, **request) as stream:
        assembled = stream.get_final_completion()
    return whole.choices[0], assembled.choices[0]


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "BookFlight"}}])
def test_streamed_tool_calls_add_up_to_the_non_streamed_ones(client, tool_choice):
    whole, streamed = streamed_and_not(client, messages=chat(PROMPTS[1]), tools=TOOLS, tool_choice=tool_choice,
                                       parallel_tool_calls=False, max_tokens=300)
    assert calls_of(streamed.message) == calls_of(whole.message) and calls_of(whole.message)
    for name, args in calls_of(whole.message):
        MODELS[name].model_validate(args)
    assert streamed.finish_reason == whole.finish_reason
    assert [c.id for c in streamed.message.tool_calls] != [c.id for c in whole.message.tool_calls]  # fresh ids


HERMES_CALL = (r'<tool_call>\n\{"name": "GetWeather", "arguments": \{"city": "(Paris|Rome|Oslo)", '
               r'"unit": "(celsius|fahrenheit)"\}\}\n</tool_call>')


def test_auto_tool_choice_parses_the_calls_the_model_writes(client):
    # SmolLM2 was not trained on tools: a regex makes it write Hermes' format, which the server's parser reads.
    request = dict(messages=chat(PROMPTS[0]), tools=TOOLS, max_tokens=200,
                   extra_body={"structured_outputs": {"regex": r"I will check\.\n" + HERMES_CALL + r"\n"
                                                               + HERMES_CALL}})
    whole, streamed = streamed_and_not(client, **request)
    assert whole.finish_reason == "tool_calls"
    assert whole.message.content == "I will check."
    calls = calls_of(whole.message)
    assert [name for name, _ in calls] == ["GetWeather", "GetWeather"]
    for _, args in calls:
        GetWeather.model_validate(args)
    assert len({c.id for c in whole.message.tool_calls}) == 2
    assert calls_of(streamed.message) == calls_of(whole.message)
    assert streamed.message.content == whole.message.content and streamed.finish_reason == "tool_calls"


def test_auto_tool_choice_leaves_a_plain_answer_alone(client):
    whole, streamed = streamed_and_not(client, messages=chat("Say hi."), tools=TOOLS, tool_choice="auto",
                                       max_tokens=40, extra_body={"guided_regex": r"Hi( there)?!"})
    assert whole.message.content in ("Hi!", "Hi there!") and not whole.message.tool_calls
    assert whole.finish_reason == "stop"
    assert streamed.message.content == whole.message.content and not streamed.message.tool_calls


def test_a_conversation_with_tool_results_goes_on(client):
    first = client.chat.completions.create(
        model=MODEL, messages=chat(PROMPTS[0]), tools=TOOLS, max_tokens=100, temperature=0,
        tool_choice={"type": "function", "function": {"name": "GetWeather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = chat(PROMPTS[0]) + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=30, temperature=0)
    message = reply.choices[0].message
    # This server's deepseek_r1 parser reads an answer that never closes </think> as reasoning.
    assert message.reasoning_content and not message.content and not message.tool_calls


def test_reasoning_content_is_split_off(client, server):
    # deepseek_r1: its template opens <think> in the prompt, so all output before </think> is thinking. SmolLM2
    # never closes it, so the whole answer is reasoning: the very text the completions endpoint gives for the same
    # prompt tokens.
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    ids = httpx.post(f"{server.base}/tokenize", json={"model": MODEL, "messages": messages},
                     headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]
    text = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0).choices[0].text
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    message = whole.choices[0].message
    assert message.reasoning_content == text and not message.content
    chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                            stream=True)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == text
    assert not "".join(d.content or "" for d in deltas)


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "Nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "messages"),
])
def test_bad_tool_requests_are_400s_naming_the_field(server, body, param):
    request = {"model": MODEL, "messages": chat("Hi"), "max_tokens": 5, **body}
    r = httpx.post(f"{server.base}/v1/chat/completions", json=request, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert httpx.get(f"{server.base}/health").status_code == 200
