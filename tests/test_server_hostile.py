"""A hostile client against a real server: every bad input gets a 4xx in OpenAI's shape, requests in flight
finish, and the server goes on serving. A fault in one request fails that request alone; a fault in the
engine loop ends the process (non-zero) instead of leaving a server that answers 503 forever."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from fault_injection import MARKER
from server_process import ServerProcess

KEY = "sk-hostile"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "hi"}]
NESTED_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
FAULTS = [str(Path(__file__).with_name("fault_injection.py"))]


def tiny_server(tiny_llama, *flags: str, fault: str | None = None) -> ServerProcess:
    """A ready server for the tiny model; ``fault`` names one of fault_injection.py's modes."""
    return ServerProcess([str(tiny_llama), "--dtype", "float32", "--served-model-name", "tiny", *flags],
                         launcher=[*FAULTS, fault] if fault else None).wait_ready()


@pytest.fixture(scope="module")
def server(tiny_llama):
    proc = tiny_server(tiny_llama, "--api-key", KEY, "--max-model-len", "256", "--max-n", "16")
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=120)


class Background:
    """A streamed completion that runs while the test does something else; ``join`` returns its chunks."""

    def __init__(self, base: str, max_tokens: int = 120, prompt: list[int] | None = None) -> None:
        self.chunks: list[dict] = []
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.max_tokens = max_tokens
        body = {"model": "tiny", "prompt": prompt or [5, 6, 7], "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True}}

        def run() -> None:
            try:
                with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            self.chunks.append(json.loads(line[6:]))
                            self.started.set()
            except BaseException as e:  # noqa: BLE001 - reported by join()
                self.error = e
            finally:
                self.started.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.started.wait(120), "the background stream never started"

    def join(self) -> list[dict]:
        self.thread.join(timeout=120)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self.chunks

    def assert_completed(self) -> None:
        chunks = self.join()
        assert not any("error" in c for c in chunks), chunks[-1]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == "length" and chunks[-1]["usage"]["completion_tokens"] == self.max_tokens


def _post(server, path: str, body, **kw) -> httpx.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server.base}{path}", content=data, headers={**AUTH, "Content-Type": "application/json"},
                      timeout=60, **kw)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_still_serves(client) -> None:
    ok = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")


# Each reproducer from the issue, as the raw bytes a client sent, and the answer it must get.
BAD = [
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "logit_bias": {"99999999": 5}}, "logit_bias"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "min_tokens": 2, "stop_token_ids": [99999999]},
     "stop_token_ids"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "allowed_token_ids": [3, 10**9]}, "allowed_token_ids"),
    ("/v1/completions", {"model": "tiny", "prompt": [5, 10**12]}, "prompt"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     "temperature"),
    ("/v1/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "repetition_penalty": NaN}',
     "repetition_penalty"),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "top_p": Infinity}', "top_p"),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "logit_bias": {"5": -Infinity}}', "logit_bias.5"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "n": 2000}, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 1, "best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "seed": 2**64}, "seed"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "chat_template": NESTED_LOOP}, "chat_template"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', None),
    ("/v1/completions", '{"model": "tiny", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", None),
]


@pytest.mark.parametrize("path, body, param", BAD, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD)])
def test_bad_input_gets_a_400_while_a_stream_in_flight_completes(server, client, path, body, param):
    stream = Background(server.base)
    assert_openai_error(_post(server, path, body), 400, param)
    stream.assert_completed()
    assert_still_serves(client)


def test_framework_errors_have_openai_shape_too(server):
    assert_openai_error(httpx.get(f"{server.base}/v1/chat/completions", headers=AUTH), 405)
    assert_openai_error(httpx.get(f"{server.base}/v1/nothing-here", headers=AUTH), 404)
    assert_openai_error(httpx.get(f"{server.base}/nothing-here"), 404)
    assert_openai_error(httpx.get(f"{server.base}/v1/models"), 401)


def test_health_answers_as_vllm_does_and_its_schema_says_so(server):
    r = httpx.get(f"{server.base}/health")
    assert r.status_code == 200 and r.content == b""
    op = httpx.get(f"{server.base}/openapi.json").json()["paths"]["/health"]["get"]
    assert "application/json" not in op["responses"]["200"].get("content", {})


def test_a_chat_template_in_a_request_is_refused_unless_trusted(server):
    r = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": CHAT,
                                               "chat_template": "{{ messages[0]['content'] }}"})
    err = assert_openai_error(r, 400, "chat_template")
    assert "--trust-request-chat-template" in err["message"]


def test_a_runaway_trusted_template_times_out_without_stalling_the_server(tiny_llama):
    proc = tiny_server(tiny_llama, "--trust-request-chat-template", "--chat-template-timeout", "2")
    try:
        result: dict = {}

        def render() -> None:
            result["r"] = httpx.post(f"{proc.base}/v1/chat/completions", timeout=120,
                                     json={"model": "tiny", "messages": CHAT, "chat_template": NESTED_LOOP})

        t = threading.Thread(target=render)
        t.start()
        # While the template runs, the event loop keeps answering probes and other chats.
        health = []
        while t.is_alive():
            health.append(httpx.get(f"{proc.base}/health", timeout=10).status_code)
        assert health and set(health) == {200}
        err = assert_openai_error(result["r"], 400, "messages")
        assert err["code"] == "chat_template_timeout"
        ok = httpx.post(f"{proc.base}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": CHAT, "max_tokens": 2,
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
        assert ok.status_code == 200, ok.text
    finally:
        assert proc.stop() == 0


def test_a_burst_cannot_overfill_the_waiting_queue(tiny_llama):
    proc = tiny_server(tiny_llama, "--max-num-seqs", "4", "--max-queue-len", "8")
    try:
        gate = threading.Barrier(40)
        answers: list[httpx.Response] = []
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True}

        def arrive() -> None:
            gate.wait()
            answers.append(httpx.post(f"{proc.base}/v1/completions", json=body, timeout=300))

        threads = [threading.Thread(target=arrive) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        refused = [r for r in answers if r.status_code == 503]
        served = [r for r in answers if r.status_code == 200]
        assert len(refused) + len(served) == 40
        # 4 run and 8 wait; each takes 400 steps, so nearly the whole burst arrives at a full queue.
        assert len(refused) >= 40 - 4 - 8 - 8, [r.status_code for r in answers]
        for r in refused:
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
        assert all(r.json()["usage"]["completion_tokens"] == 400 for r in served)
    finally:
        assert proc.stop() == 0


def test_a_fault_in_one_request_fails_it_alone(tiny_llama):
    proc = tiny_server(tiny_llama, fault="row")
    try:
        streams = [Background(proc.base, max_tokens=150, prompt=[5, 6, 7 + i]) for i in range(3)]
        bad = httpx.post(f"{proc.base}/v1/completions", timeout=60,
                         json={"model": "tiny", "prompt": MARKER + [7], "max_tokens": 50, "ignore_eos": True})
        err = assert_openai_error(bad, 500)
        assert err["code"] == "request_failed" and "injected fault" in err["message"]
        # Streamed, the failure arrives as an error event after the tokens already sent.
        with httpx.stream("POST", f"{proc.base}/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": MARKER + [7], "max_tokens": 50, "stream": True,
                                "ignore_eos": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "request_failed"
        assert all("choices" in e for e in events[:-1])  # what went out before the fault was normal output
        for s in streams:
            s.assert_completed()
        metrics = httpx.get(f"{proc.base}/metrics").text
        assert 'flotilla:request_errors_total{model_name="tiny"} 2.0' in metrics
        assert httpx.get(f"{proc.base}/health").status_code == 200
        assert _kv_usage(proc) == 0.0  # the failed requests' blocks went back to the pool
    finally:
        assert proc.stop() == 0


def test_a_dead_engine_loop_ends_the_process_non_zero(tiny_llama):
    proc = tiny_server(tiny_llama, fault="forward")
    try:
        stream = Background(proc.base, max_tokens=400)
        bad = httpx.post(f"{proc.base}/v1/completions", timeout=60,
                         json={"model": "tiny", "prompt": MARKER + [7], "max_tokens": 5})
        err = assert_openai_error(bad, 503)
        assert err["code"] == "engine_dead" and bad.headers["retry-after"]
        chunks = stream.join()
        assert chunks[-1]["error"]["code"] == "engine_dead"  # the in-flight stream is told, not left hanging
        assert proc.proc.wait(timeout=60) == 1
    finally:
        proc.stop()


def test_a_model_that_cannot_load_ends_the_process_non_zero(tmp_path):
    proc = ServerProcess([str(tmp_path / "no-such-model"), "--served-model-name", "tiny"])
    try:
        assert proc.proc.wait(timeout=120) == 1
    finally:
        proc.stop()  # never leave a server behind, whatever the outcome


def _kv_usage(proc) -> float:
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(f"{proc.base}/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("vllm:kv_cache_usage_perc{"))
        value = float(line.rsplit(" ", 1)[1])
        if value == 0.0 or time.monotonic() > deadline:
            return value
        time.sleep(0.05)

