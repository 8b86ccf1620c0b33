"""The real server on a loopback port, driven by the official openai SDK and raw HTTP."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import hf_greedy
from server_process import ServerProcess

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY = "sk-test-flotilla"


@pytest.fixture(scope="module")
def server():
    # TRITON_INTERPRET=0: as deployed on a CPU node (the kernel tests in this session set it for themselves).
    proc = ServerProcess(["--max-model-len", "512", "--dtype", "float32", "--max-queue-len", "64"],
                         env={"FLOTILLA_API_KEY": KEY, "TRITON_INTERPRET": "0"}).wait_ready()
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=120)


def _metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.base}/metrics").text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + (f"{{{sample.labels.get('finished_reason')}}}" if "finished_reason" in sample.labels else "")
            values[key] = values.get(key, 0.0) + sample.value
    return values


def test_a_cpu_server_never_loads_triton(server, client):
    pytest.importorskip("triton")  # installed here, so something could load it
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)  # every code path of a request has run
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "triton" not in maps  # no libtriton.so mapped: neither imported nor able to print at exit


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_greedy_matches_transformers_and_counts_usage(client, smollm2_dir, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                          logprobs=True, top_logprobs=2)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = hf_greedy(smollm2_dir, list(prompt), 24, min_new_tokens=0)
    choice = resp.choices[0]
    assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert resp.usage.prompt_tokens == len(prompt)
    assert resp.usage.completion_tokens == len(expected) == len(choice.logprobs.content)
    assert resp.usage.total_tokens == len(prompt) + len(expected)
    assert choice.finish_reason == ("stop" if expected[-1] == tokenizer.eos_token_id else "length")
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
               for t in choice.logprobs.content)


def test_chat_stream_reassembles_the_non_stream_answer(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_with_several_prompts_n_and_echo(client, tokenizer):
    resp = client.completions.create(model=MODEL, prompt=["Once upon a time", "The sky is"], n=2, max_tokens=8,
                                     temperature=0.8, seed=3)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    prompt_tokens = len(tokenizer.encode("Once upon a time")) + len(tokenizer.encode("The sky is"))
    assert resp.usage.prompt_tokens == prompt_tokens
    echoed = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Hello")
    by_ids = client.completions.create(model=MODEL, prompt=tokenizer.encode("Hello"), max_tokens=4, temperature=0)
    assert echoed.choices[0].text == "Hello" + by_ids.choices[0].text


def test_stop_strings_end_the_text(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    stop = text.strip()[:2]
    assert stop
    resp = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == text[: text.index(stop)]


def test_seed_makes_sampling_reproducible(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a word."}], temperature=1.0,
                  max_tokens=16)
    a = client.chat.completions.create(seed=42, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=42, **kwargs).choices[0].message.content
    outs = {client.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in (1, 2, 3)}
    assert a == b
    assert len(outs | {a}) > 1


def test_vllm_extra_body_fields_are_honoured(client):
    resp = client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, temperature=0,
                                     extra_body={"min_tokens": 6, "ignore_eos": True, "top_k": 1,
                                                 "repetition_penalty": 1.1})
    assert resp.usage.completion_tokens == 6


def test_tokenize_and_detokenize_round_trip(server, tokenizer):
    h = {"Authorization": f"Bearer {KEY}"}
    tok = httpx.post(f"{server.base}/tokenize", json={"prompt": "Hello, world!"}, headers=h).json()
    assert tok["tokens"] == tokenizer.encode("Hello, world!") and tok["count"] == len(tok["tokens"])
    back = httpx.post(f"{server.base}/detokenize", json={"tokens": tok["tokens"]}, headers=h).json()
    assert back["prompt"] == "Hello, world!"
    assert httpx.get(f"{server.base}/version").json()["version"]


def test_metrics_parse_and_move(server, client):
    before = _metrics(server)
    client.completions.create(model=MODEL, prompt="Count: 1, 2,", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    after = _metrics(server)
    names = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
             "vllm:gpu_cache_usage_perc", "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
             "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
             "vllm:time_to_first_token_seconds_count", "vllm:time_per_output_token_seconds_count",
             "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
             "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count", "flotilla:engine_info"}
    assert names <= set(after), names - set(after)
    assert after["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0) == 5
    assert after["vllm:request_success_total{length}"] - before.get("vllm:request_success_total{length}", 0) == 1
    assert after["vllm:e2e_request_latency_seconds_count"] > before.get("vllm:e2e_request_latency_seconds_count", 0)
    assert after["vllm:prefix_cache_queries_total"] > before.get("vllm:prefix_cache_queries_total", 0)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ("{not json", 400, None),
        ({"model": MODEL, "messages": "hello"}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 600}]}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 600}, 400, "max_tokens"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, body, status, param):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server.base}/v1/chat/completions", content=data, headers=h)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param, err
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_api_key_is_required_on_v1_but_not_on_probes(server):
    url = f"{server.base}/v1/models"
    assert httpx.get(url).status_code == 401
    r = httpx.get(url, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{server.base}/health").status_code == 200
    assert httpx.get(f"{server.base}/metrics").status_code == 200


def test_oversized_body_is_refused(server):
    big = json.dumps({"model": MODEL, "prompt": "x" * (17 * 2**20)})
    r = httpx.post(f"{server.base}/v1/completions", content=big,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_disconnected_streams_free_their_blocks(server):
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "Write a long story about a ship.", "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    for _ in range(3):
        with httpx.stream("POST", f"{server.base}/v1/completions", json=body, headers=h, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = _metrics(server)
        if m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0.0:
            break
        time.sleep(0.1)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0.0  # every block back in the pool


def test_sigterm_drains_in_flight_requests_then_exits_zero(tiny_llama):
    proc = ServerProcess([str(tiny_llama), "--dtype", "float32", "--served-model-name", "tiny"]).wait_ready()
    result: dict = {}

    def stream() -> None:
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 300, "stream": True, "ignore_eos": True}
        chunks = []
        with httpx.stream("POST", f"{proc.base}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    result["started"] = True
        result["finish"] = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]

    t = threading.Thread(target=stream)
    t.start()
    while not result.get("started"):
        time.sleep(0.01)
    proc.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert httpx.get(f"{proc.base}/health").status_code == 503
    late = httpx.post(f"{proc.base}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert late.status_code == 503 and late.headers.get("retry-after")
    t.join(timeout=120)
    assert result["finish"] == "length"  # the in-flight stream ran to its end
    assert proc.proc.wait(timeout=60) == 0


def test_the_operator_reads_this_engines_metrics(server):
    from flotilla.operator.autoscaler import parse_metrics

    sample = parse_metrics(httpx.get(f"{server.base}/metrics").text)
    assert 0.0 <= sample.kv_usage <= 1.0 and sample.waiting == 0
    facts = sample.facts
    assert facts is not None and facts.block_size == 16 and facts.max_model_len == 512
    assert facts.num_gpu_blocks > 0 and facts.model_name == MODEL and facts.model_load_seconds > 0


def test_a_full_waiting_queue_answers_503_with_retry_after(tiny_llama):
    proc = ServerProcess([str(tiny_llama), "--dtype", "float32", "--served-model-name", "tiny",
                          "--max-num-seqs", "1", "--max-queue-len", "1"]).wait_ready()
    url = f"{proc.base}/v1/completions"
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 300, "ignore_eos": True}
    statuses: list[int] = []
    try:
        # One request runs (max_num_seqs 1), a second waits: the queue is then full.
        workers = [threading.Thread(target=lambda: statuses.append(httpx.post(url, json=body, timeout=120).status_code))
                   for _ in range(2)]
        for w in workers:
            w.start()
            time.sleep(0.3)
        deadline = time.monotonic() + 20
        while _metrics(proc)["vllm:num_requests_waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        late = httpx.post(url, json={**body, "max_tokens": 2})
        assert late.status_code == 503 and late.headers["retry-after"]
        assert late.json()["error"]["code"] == "queue_full"
        for w in workers:
            w.join(timeout=120)
        assert statuses == [200, 200]  # the admitted requests were served
        assert httpx.post(url, json={**body, "max_tokens": 2}).status_code == 200  # room again
    finally:
        assert proc.stop() == 0
