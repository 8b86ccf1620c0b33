"""spec.adapters in the operator: the engine flags and readiness gate it renders (and that the adapter list leaves
the pod template alone, so changing it restarts nothing), the plan that brings a pod to the spec, and that plan
carried out against a real ``flotilla serve`` through its own endpoints (load, reload on a changed URI, unload, a
refusal reported without holding the pod back, an API key); the router maps adapter names to their service."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conftest import build_tiny
from lora_fixtures import build_adapter
from operator_fixtures.oracle import admit, k8s_errors
from server_process import ServerProcess

from flotilla.operator.adapters import (
    adapters_status, engines_to_sync, gate_condition, gate_open, gate_stale, loaded_adapters, plan, sync_pods)
from flotilla.operator.render import ADAPTERS_CONDITION, render_deployment
from flotilla.operator.spec import AdapterSpec, parse_service
from flotilla.router.kubernetes import table_from


def service(spec: dict):
    body = {"apiVersion": "flotilla.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "chat", "namespace": "team-a", "uid": "u", "generation": 1},
            "spec": {"model": {"uri": "org/base-8B"}, **spec}}
    stored, errors = admit(body)
    assert errors == []
    return stored, parse_service(stored)


def test_lora_flags_env_and_readiness_gate_and_the_adapter_list_restarts_nothing():
    _, svc = service({"adapters": [{"name": "sql", "uri": "org/sql-lora"}]})
    dep = render_deployment(svc)
    assert k8s_errors(dep) == []
    pod = dep["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--max-loras") + 1] == "4" and args[args.index("--max-lora-rank") + 1] == "16"
    assert "--enable-lora" in args and "--lora-modules" not in args
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "true"} in pod["containers"][0]["env"]
    assert pod["readinessGates"] == [{"conditionType": ADAPTERS_CONDITION}]
    # another adapter list, the same pods: adapters come and go through the engines' endpoints
    _, more = service({"adapters": [{"name": "sql", "uri": "org/sql-lora"}, {"name": "chat2", "uri": "s3://b/c"}]})
    assert render_deployment(more) == dep
    _, tuned = service({"lora": {"maxLoras": 2, "maxLoraRank": 64, "maxCpuLoras": 8}})
    args = render_deployment(tuned)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-cpu-loras") + 1] == "8" and args[args.index("--max-lora-rank") + 1] == "64"
    _, plain = service({})
    plain_pod = render_deployment(plain)["spec"]["template"]["spec"]
    assert "readinessGates" not in plain_pod and "--enable-lora" not in plain_pod["containers"][0]["args"]


def test_the_spec_refuses_adapters_it_cannot_serve():
    from flotilla.operator.spec import SpecError

    base = {"apiVersion": "flotilla.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "chat", "namespace": "a"}, "spec": {"model": {"uri": "org/base-8B"}}}
    for adapters, match in [([{"name": "a", "uri": "org/a"}, {"name": "a", "uri": "org/b"}], "unique"),
                            ([{"name": "base-8B", "uri": "org/a"}], "base model's served name")]:
        with pytest.raises(SpecError, match=match):
            parse_service({**base, "spec": {**base["spec"], "adapters": adapters}})


def test_plan_loads_the_missing_reloads_the_changed_and_unloads_the_rest():
    desired = [AdapterSpec("a", "org/a"), AdapterSpec("b", "org/b2"), AdapterSpec("c", "org/c")]
    load, unload = plan(desired, {"a": "org/a", "b": "org/b1", "old": "org/old"})
    assert [x.name for x in load] == ["b", "c"] and unload == ["b", "old"]
    assert plan(desired, {"a": "org/a", "b": "org/b2", "c": "org/c"}) == ([], [])
    models = {"data": [{"id": "base", "parent": None, "root": "/m"}, {"id": "a", "parent": "base", "root": "org/a"}]}
    assert loaded_adapters(models) == {"a": "org/a"}


def _pod(name, ip, containers_ready, gate=None, deleting=False, restarts=0):
    pod = {"metadata": {"name": name, **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {})},
           "status": {"podIP": ip, "conditions": [
               {"type": "ContainersReady", "status": "True" if containers_ready else "False"}],
               "containerStatuses": [{"name": "engine", "restartCount": restarts}]}}
    if gate is not None:
        pod["status"]["conditions"].append({**gate_condition(pod, 1, 1), "status": gate})
    return pod


def test_pods_are_synced_once_their_server_answers_gate_or_not():
    pods = [_pod("up", "10.0.0.1", True), _pod("loading", "10.0.0.2", False), _pod("gated", "10.0.0.3", True, "False"),
            _pod("leaving", "10.0.0.4", True, "True", deleting=True)]
    assert engines_to_sync(pods) == [("up", "http://10.0.0.1:8000"), ("gated", "http://10.0.0.3:8000")]
    assert not gate_open(pods[2]) and gate_open(pods[3]) and not gate_stale(pods[3])


def test_a_restarted_engine_finds_its_gate_stale():
    """The gate names the engine restart count it was opened for: after a restart (adapters gone) it no longer
    counts."""
    pod = _pod("p", "10.0.0.1", False, "True")
    pod["status"]["containerStatuses"][0]["restartCount"] = 1
    assert not gate_open(pod) and gate_stale(pod)


def test_the_router_sends_an_adapter_to_its_base_models_engines():
    stored, _ = service({"adapters": [{"name": "sql", "uri": "org/sql-lora"}]})
    table, owners = table_from([stored], [])
    assert set(table) == {"base-8B", "sql"} and owners["sql"] == [("team-a", "chat", 1)]


@pytest.mark.slow
def test_sync_brings_a_real_engine_to_the_spec_through_its_endpoints(tmp_path, tokenizer):
    base = build_tiny("llama", tmp_path / "base", tokenizer)
    paths = {name: str(build_adapter(base, tmp_path / name, seed, rank=8)) for name, seed in
             [("sql", 1), ("sql-v2", 2), ("chat", 3)]}
    wide = build_tiny("llama", tmp_path / "wide", tokenizer, hidden_size=96)
    paths["foreign"] = str(build_adapter(wide, tmp_path / "foreign", 4, targets=["q_proj"]))
    proc = ServerProcess([str(base), "--dtype", "float32", "--served-model-name", "base", "--enable-lora",
                          "--max-loras", "2", "--num-gpu-blocks-override", "32", "--no-warmup"],
                         env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "FLOTILLA_API_KEY": "k3y"}).wait_ready()
    target = [("pod-0", proc.base)]

    def served() -> dict[str, str]:
        models = httpx.get(f"{proc.base}/v1/models", headers={"Authorization": "Bearer k3y"}).json()
        return loaded_adapters(models)

    try:
        first = [AdapterSpec("sql", paths["sql"]), AdapterSpec("chat", paths["chat"])]
        [r] = asyncio.run(sync_pods(target, first, "k3y"))
        assert r.error is None and r.failed == {} and dict(r.loaded) == {"sql": paths["sql"], "chat": paths["chat"]}
        assert served() == dict(r.loaded)
        # sql moves to a new URI, chat goes, a foreign adapter is refused with the engine's reason
        second = [AdapterSpec("sql", paths["sql-v2"]), AdapterSpec("foreign", paths["foreign"])]
        [r] = asyncio.run(sync_pods(target, second, "k3y"))
        assert served() == {"sql": paths["sql-v2"]} == dict(r.loaded)
        assert "another base model" in r.failed["foreign"]
        status = adapters_status(second, [r])
        assert status["adapters"][0] == {"name": "sql", "uri": paths["sql-v2"], "readyReplicas": 1}
        assert status["adapters"][1]["readyReplicas"] == 0 and "pod-0: " in status["adapters"][1]["message"]
        assert status["adapterPods"] == [{"pod": "pod-0", "loaded": ["sql"]}]
        # nothing to do twice over; without the key the pod cannot be asked, and says why
        [again] = asyncio.run(sync_pods(target, second[:1], "k3y"))
        assert dict(again.loaded) == {"sql": paths["sql-v2"]} and again.failed == {}
        [locked] = asyncio.run(sync_pods(target, second[:1], None))
        assert locked.error is not None and "API key" in locked.error
    finally:
        assert proc.stop() == 0
