"""Multi-LoRA through a real ``flotilla serve`` process and the openai SDK: adapters from ``--lora-modules`` and loaded
or unloaded at run time (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``), chosen by the request's ``model``, listed by
``/v1/models`` with their ``parent``, swapped through one device slot when requests for several adapters arrive
together, and their greedy output checked against transformers + peft (the adapter merged). Bad adapters get a
4xx and the server goes on; a bad ``--lora-modules`` stops the start with one line."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import build_tiny, hf_greedy
from lora_fixtures import build_adapter, peft_greedy
from server_process import ServerProcess

pytestmark = pytest.mark.slow

PROMPT = [1, 1000, 23, 4, 511, 98, 12, 3, 17]
STEPS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    base = build_tiny("llama", tmp_path_factory.mktemp("srv-lora-base"), tokenizer)
    adapters = {name: build_adapter(base, tmp_path_factory.mktemp(f"srv-{name}"), seed, rank=rank)
                for name, seed, rank in [("sql", 11, 8), ("chat", 12, 16), ("math", 13, 4)]}
    proc = ServerProcess([str(base), "--dtype", "float32", "--served-model-name", "tiny", "--enable-lora",
                          "--lora-modules", f"sql={adapters['sql']}", "--max-loras", "1", "--max-cpu-loras", "1",
                          "--num-gpu-blocks-override", "128"],
                         env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}).wait_ready()
    client = openai.OpenAI(base_url=f"{proc.base}/v1", api_key="unused", max_retries=0)
    yield base, adapters, proc, client
    assert proc.stop() == 0


def test_adapters_are_listed_with_their_parent(setup):
    _, adapters, _, client = setup
    cards = {m.id: m for m in client.models.list().data}
    assert cards["tiny"].parent is None
    assert cards["sql"].parent == "tiny" and cards["sql"].root == str(adapters["sql"])


def test_the_model_field_picks_the_adapter(setup, tokenizer):
    base, adapters, _, client = setup
    for model, want in [("sql", peft_greedy(base, adapters["sql"], PROMPT, STEPS)),
                        ("tiny", hf_greedy(base, PROMPT, STEPS))]:
        out = client.completions.create(model=model, prompt=PROMPT, max_tokens=STEPS, temperature=0,
                                        extra_body={"min_tokens": STEPS})
        assert out.model == model
        assert out.choices[0].text == tokenizer.decode(want, skip_special_tokens=True), model
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)


def test_load_use_unload_at_run_time_through_one_slot(setup, tokenizer):
    base, adapters, proc, client = setup
    for name in ("chat", "math"):
        reply = client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": str(adapters[name])},
                            cast_to=httpx.Response)
        assert reply.status_code == 200 and name in reply.text
    assert {"sql", "chat", "math"} <= {m.id for m in client.models.list().data}
    want = {name: tokenizer.decode(peft_greedy(base, adapters[name], PROMPT, STEPS), skip_special_tokens=True)
            for name in adapters}
    assert len(set(want.values())) == 3  # three different answers: a wrong adapter would show

    def ask(name):
        out = client.completions.create(model=name, prompt=PROMPT, max_tokens=STEPS, temperature=0,
                                        extra_body={"min_tokens": STEPS})
        return name, out.choices[0].text

    # three adapters at once through --max-loras 1: each request waits for the slot, none gets another's weights
    with ThreadPoolExecutor(6) as pool:
        for name, text in pool.map(ask, ["sql", "chat", "math", "chat", "sql", "math"]):
            assert text == want[name], name
    metrics = httpx.get(f"{proc.base}/metrics").text
    assert 'vllm:lora_requests_info{max_lora="1"' in metrics

    reply = client.post("/unload_lora_adapter", body={"lora_name": "chat"}, cast_to=httpx.Response)
    assert reply.status_code == 200
    assert "chat" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="chat", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="cannot be found"):
        client.post("/unload_lora_adapter", body={"lora_name": "chat"}, cast_to=httpx.Response)
    assert ask("math") == ("math", want["math"])  # the others serve on


def test_bad_adapters_get_a_400_and_the_server_goes_on(setup, tmp_path):
    _, adapters, _, client = setup
    for body, match in [({"lora_name": "x", "lora_path": str(tmp_path / "nowhere")}, "lora_path"),
                        ({"lora_name": "x", "lora_path": str(tmp_path)}, "adapter_config.json"),
                        ({"lora_name": "sql", "lora_path": str(adapters["math"])}, "already been loaded"),
                        ({"lora_name": "tiny", "lora_path": str(adapters["math"])}, "base model"),
                        ({"lora_name": "x"}, "must be provided")]:
        with pytest.raises(openai.BadRequestError, match=match):
            client.post("/load_lora_adapter", body=body, cast_to=httpx.Response)
    assert client.completions.create(model="sql", prompt=PROMPT, max_tokens=2).choices[0].text


def test_runtime_updates_need_the_opt_in(tmp_path, tokenizer):
    base = build_tiny("llama", tmp_path / "base", tokenizer)
    proc = ServerProcess([str(base), "--dtype", "float32", "--enable-lora", "--num-gpu-blocks-override", "32",
                          "--no-warmup"], env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": ""}).wait_ready()
    try:
        reply = httpx.post(f"{proc.base}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(base)})
        assert reply.status_code == 404
    finally:
        assert proc.stop() == 0


def test_a_bad_lora_module_stops_the_start_with_one_line(tmp_path, tokenizer):
    base = build_tiny("llama", tmp_path / "base", tokenizer)
    done = subprocess.run([sys.executable, "-m", "flotilla.engine.serve", str(base), "--dtype", "float32",
                           "--enable-lora", "--lora-modules", f"bad={tmp_path}", "--num-gpu-blocks-override", "32",
                           "--no-warmup", "--port", "0"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "--lora-modules bad" in last and "adapter_config.json" in last
    done = subprocess.run([sys.executable, "-m", "flotilla.engine.serve", str(base), "--lora-modules", "x"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "NAME=PATH" in done.stderr.strip().splitlines()[-1]
