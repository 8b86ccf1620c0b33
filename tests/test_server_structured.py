"""Structured output through the real server, driven by the official openai SDK: ``chat.completions.parse`` with
Pydantic models, vLLM's guided_* extra fields, streamed against non-streamed, 400s naming the field, and the prefix
cache's hits in ``usage.prompt_tokens_details``."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from server_process import sdk_client, serving

pytest.importorskip("xgrammar")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY = "sk-test-structured"


@pytest.fixture(scope="module")
def server():
    with serving(["--max-model-len", "1024", "--dtype", "float32", "--max-num-seqs", "32"], KEY) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return sdk_client(server, KEY)


Short = Field(max_length=24)


class City(BaseModel):
    name: str = Short
    country: str = Short
    population_millions: float = Field(ge=0, le=40)


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Product(BaseModel):
    title: str = Short
    price: float = Field(ge=0, le=10000)
    colour: Colour
    in_stock: bool


class Address(BaseModel):
    street: str = Short
    city: str = Short
    postcode: str = Field(pattern=r"^[0-9]{5}$")


class Customer(BaseModel):
    name: str = Short
    address: Address
    tier: Literal["free", "pro", "enterprise"]


class Step(BaseModel):
    order: int = Field(ge=1, le=10)
    action: str = Short


class Recipe(BaseModel):
    dish: str = Short
    servings: int = Field(ge=1, le=12)
    steps: list[Step] = Field(min_length=1, max_length=3)


class Ticket(BaseModel):
    summary: str = Short
    severity: Literal["low", "medium", "high"]
    labels: list[Literal["bug", "ui", "backend", "docs"]] = Field(max_length=3)


class Meeting(BaseModel):
    title: str = Short
    attendees: list[str] = Field(min_length=1, max_length=3)
    minutes: int = Field(ge=5, le=240)


CASES = [
    (City, "Tell me about Paris."), (City, "Describe Tokyo in numbers."), (City, "What about Nairobi?"),
    (Product, "Invent a product for a garden shop."), (Product, "A blue running shoe on sale."),
    (Product, "Describe a red kettle that is out of stock."),
    (Customer, "Create a customer record for Ana in Lisbon."), (Customer, "A pro customer from Berlin."),
    (Customer, "An enterprise account in Madrid."),
    (Recipe, "How do I make pancakes?"), (Recipe, "A simple tomato soup."), (Recipe, "Make a cup of tea."),
    (Ticket, "The login button is invisible on mobile."), (Ticket, "The API returns 500 on empty input."),
    (Ticket, "Typo in the installation guide."),
    (Meeting, "Plan a sprint review with the team."), (Meeting, "A one-on-one with Sam."),
    (Meeting, "Quarterly planning with finance."),
    (Step, "What is the first step to bake bread?"), (Address, "Write an address in Paris."),
]


def test_parse_returns_a_valid_instance_for_every_prompt_and_schema(client):
    def ask(case):
        model, question = case
        return client.chat.completions.parse(
            model=MODEL, messages=[{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": question}],
            response_format=model, temperature=0, max_tokens=300)

    with ThreadPoolExecutor(len(CASES)) as pool:  # at once: the engine batches them with their own grammars
        results = list(pool.map(ask, CASES))
    for (model, question), resp in zip(CASES, results):
        choice = resp.choices[0]
        assert choice.finish_reason == "stop", (question, choice.message.content)
        assert isinstance(choice.message.parsed, model), (question, choice.message.content)
        model.model_validate_json(choice.message.content)  # the text itself, not only what the SDK made of it


@pytest.mark.parametrize("extra, check", [
    ({"guided_regex": r"[A-Z]{2}-[0-9]{4}"}, lambda t: re.fullmatch(r"[A-Z]{2}-[0-9]{4}", t)),
    ({"guided_choice": ["positive", "negative", "neutral"]}, lambda t: t in ("positive", "negative", "neutral")),
    ({"structured_outputs": {"regex": r"(yes|no), because [a-z ]{1,30}\."}},
     lambda t: re.fullmatch(r"(yes|no), because [a-z ]{1,30}\.", t)),
    ({"guided_grammar": 'root ::= "[" num ("," num)? ("," num)? "]"\nnum ::= [1-9] [0-9]?'},
     lambda t: re.fullmatch(r"\[[1-9][0-9]?(,[1-9][0-9]?){0,2}\]", t)),
])
def test_regex_choice_and_grammar_outputs_always_match(client, extra, check):
    questions = ["Give me a flight code.", "How was the film?", "Is water wet?", "List some small numbers.",
                 "Anything to add?"]
    for q in questions:
        for temperature in (0.0, 1.0):
            resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], seed=3,
                                                  temperature=temperature, max_tokens=64, extra_body=extra)
            text = resp.choices[0].message.content
            assert resp.choices[0].finish_reason == "stop" and check(text), (q, temperature, text)


def test_completions_take_response_format_too(client):
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}}
    resp = client.completions.create(model=MODEL, prompt="Paris, as JSON:", max_tokens=200, temperature=0,
                                     extra_body={"response_format": schema})
    assert resp.choices[0].finish_reason == "stop"
    City.model_validate(json.loads(resp.choices[0].text))


def test_streamed_and_non_streamed_agree(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Describe Rome."}], temperature=0, max_tokens=200,
                  response_format={"type": "json_schema", "json_schema": {
                      "name": "city", "strict": True, "schema": City.model_json_schema()}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
             if c.choices]
    assert "".join(parts) == whole
    City.model_validate_json(whole)


@pytest.mark.parametrize("extra, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strange"}}}},
     "response_format", "invalid JSON schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "type must be text, json_object or json_schema"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "invalid regex"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_grammar": "root ::= "}, "guided_grammar", "invalid grammar"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "cannot be combined with guided_regex"),
    ({"structured_outputs": {"regex": "a", "wat": 1}}, "structured_outputs", "unknown field(s) wat"),
    ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_regex", "not available"),
])
def test_an_invalid_grammar_is_a_400_naming_the_field_and_the_server_goes_on(server, client, extra, param, message):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    r = httpx.post(f"{server.base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_usage_reports_the_prompt_tokens_the_prefix_cache_served(client):
    system = "You are a meticulous assistant. " * 20
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Say hi."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0).usage
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0).usage
    assert first.prompt_tokens == second.prompt_tokens > 100
    assert first.prompt_tokens_details.cached_tokens == 0
    # Every full block of the prompt but the last token's (which must be recomputed to sample) comes from the cache.
    assert second.prompt_tokens_details.cached_tokens == (second.prompt_tokens - 1) // 16 * 16


def test_auto_tool_choice_needs_the_servers_parser(server):
    # This server has no --enable-auto-tool-choice: tools with tool_choice auto (OpenAI's default) are refused, as
    # vLLM refuses them, rather than answered as if no tools were given.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra in ({}, {"tool_choice": "auto"}):
        r = httpx.post(f"{server.base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "tools": tools,
                             **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
        assert "--enable-auto-tool-choice" in r.json()["error"]["message"]
