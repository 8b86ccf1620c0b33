"""Property-based fuzzing of the real server from its own OpenAPI schema (schemathesis): valid and invalid
requests to every route, a bounded number of each. No answer may be a 5xx, every 4xx has OpenAI's error
shape, and the server is healthy and serving afterwards."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from server_process import ServerProcess

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 40  # per operation and mode: bounded, and derandomized so a run is repeatable


@pytest.fixture(scope="module")
def fuzzed_server(tiny_llama):
    # Short context and a small n cap keep each generated request cheap; the limits are what is fuzzed.
    proc = ServerProcess([str(tiny_llama), "--dtype", "float32", "--served-model-name", "tiny", "--api-key", KEY,
                          "--max-model-len", "128", "--max-n", "4", "--chat-template-timeout", "5"]).wait_ready()
    yield proc
    assert httpx.get(f"{proc.base}/health").status_code == 200
    ok = httpx.post(f"{proc.base}/v1/chat/completions", headers=AUTH, timeout=60,
                    json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert proc.stop() == 0


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_request_the_schema_allows_or_forbids_gets_a_5xx(fuzzed_server, mode):
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    answers: list[int] = []

    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def check(case) -> None:
            response = case.call(base_url=fuzzed_server.base, headers=AUTH, timeout=60)
            answers.append(response.status_code)
            assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
            if response.status_code >= 400:
                err = response.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"], response.text

        try:
            check()
        except Unsatisfiable:
            # An operation with nothing to send (GET /health) has no invalid request to make.
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.label
    posts = [op for op in operations if op.method.upper() == "POST"]
    assert len(answers) >= len(posts) * 5, answers  # every operation that takes input was exercised
    print(f"{mode.value}: {len(answers)} requests, statuses {sorted(Counter(answers).items())}")
