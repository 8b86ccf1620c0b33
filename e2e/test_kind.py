"""End to end on a kind cluster: build both images, install with `kubectl apply -k manifests/`, apply the CPU
SmolLM2 sample, wait for Ready, call /v1/chat/completions through the Service, drive load and watch the
builtin autoscaler add replicas, then delete the cluster.

    FLOTILLA_E2E=1 .venv/bin/pytest -q e2e/test_kind.py

Needs docker, kind and kubectl on PATH. Skipped (with the reason) anywhere else, including CI, which has no
docker engine. Set FLOTILLA_E2E_KEEP=1 to keep the cluster for inspection.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = "flotilla-e2e"
ENGINE_IMAGE = "flotilla-engine:e2e-cpu"
OPERATOR_IMAGE = "flotilla-operator:e2e"
KUBECTL = ["kubectl", "--context", f"kind-{CLUSTER}"]


def _missing() -> str | None:
    if os.environ.get("FLOTILLA_E2E") != "1":
        return "set FLOTILLA_E2E=1 to run the kind suite (it builds images and a cluster: ~15 minutes)"
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no docker engine answers `docker info`"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def sh(*cmd: str, timeout: float = 1800, check: bool = True) -> str:
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def kubectl(*args: str, timeout: float = 300) -> str:
    return sh(*KUBECTL, *args, timeout=timeout)


def isvc() -> dict:
    return json.loads(kubectl("get", "isvc", "smollm2", "-n", "default", "-o", "json"))


@pytest.fixture(scope="module")
def cluster():
    sh("docker", "build", "-f", "Dockerfile.engine", "--build-arg", "VARIANT=cpu", "-t", ENGINE_IMAGE, ".")
    sh("docker", "build", "-f", "Dockerfile.operator", "-t", OPERATOR_IMAGE, ".")
    sh("kind", "delete", "cluster", "--name", CLUSTER, check=False)
    sh("kind", "create", "cluster", "--config", "e2e/kind/cluster.yaml", "--wait", "5m")
    try:
        for image in (ENGINE_IMAGE, OPERATOR_IMAGE):
            sh("kind", "load", "docker-image", image, "--name", CLUSTER)
        kubectl("apply", "-k", "manifests/")
        kubectl("-n", "flotilla-system", "set", "image", "deployment/flotilla-operator", f"*={OPERATOR_IMAGE}")
        kubectl("-n", "flotilla-system", "set", "env", "deployment/flotilla-operator",
                f"FLOTILLA_ENGINE_IMAGE={ENGINE_IMAGE}", "FLOTILLA_SCRAPE_INTERVAL_SECONDS=5")
        kubectl("-n", "flotilla-system", "rollout", "status", "deployment/flotilla-operator", "--timeout=5m")
        yield
    finally:
        if os.environ.get("FLOTILLA_E2E_KEEP") != "1":
            sh("kind", "delete", "cluster", "--name", CLUSTER, check=False)


def test_sample_becomes_ready_answers_and_scales_under_load(cluster):
    import openai

    kubectl("apply", "-f", "manifests/samples/smollm2-cpu.yaml")
    # Autoscale on KV-cache use with a low target, so a burst of long requests must add a replica.
    patch = {"spec": {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 2,
                                      "targetKVCacheUtilization": 0.05, "scaleUpStabilizationSeconds": 0}}}
    kubectl("patch", "isvc", "smollm2", "--type", "merge", "-p", json.dumps(patch))
    kubectl("wait", "--for=condition=Ready", "isvc/smollm2", "--timeout=15m", timeout=960)
    status = isvc()["status"]
    assert status["endpoint"] == "http://smollm2.default.svc:8000/v1"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    forward = subprocess.Popen([*KUBECTL, "port-forward", "svc/smollm2", f"{port}:8000"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=2)
        reply = client.chat.completions.create(model="smollm2", max_tokens=16,
                                               messages=[{"role": "user", "content": "Say hello."}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0

        def long_request(_: int) -> None:
            client.completions.create(model="smollm2", prompt="Tell a long story. " * 50, max_tokens=400,
                                      extra_body={"ignore_eos": True})

        deadline = time.monotonic() + 600
        with ThreadPoolExecutor(max_workers=12) as pool:
            futures = [pool.submit(long_request, i) for i in range(24)]
            while time.monotonic() < deadline and isvc()["spec"].get("replicas", 1) < 2:
                time.sleep(5)
            scaled = isvc()["spec"].get("replicas", 1)
            for f in futures:
                f.result()
        assert scaled == 2, f"the autoscaler did not scale up: {isvc()['status'].get('autoscaler')}"
    finally:
        forward.send_signal(signal.SIGTERM)
        forward.wait(timeout=10)
    kubectl("delete", "isvc", "smollm2", "--wait=true", timeout=300)
