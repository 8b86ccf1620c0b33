"""The shared model cache as pure logic: one loader Job per (model, revision, claim) whatever the URI's spelling,
and its Job and pods read back into the ModelCached condition (Pending, Downloading, Ready with bytes and seconds,
Failed with the loader's own error line, replaced after a while)."""
from __future__ import annotations

import json

import pytest

from flotilla.operator.model_cache import RETRY_FAILED_AFTER_SECONDS, cache_state, loader_job_name, needs_loader
from flotilla.operator.spec import parse_service

NOW = "2026-01-01T00:10:00Z"


def svc(uri: str, name: str = "a", revision: str | None = None, claim: str | None = "cache", read_only=False):
    model = {"uri": uri, **({"revision": revision} if revision else {})}
    spec = {"model": model, **({"modelCache": {"claimName": claim, "readOnly": read_only}} if claim else {})}
    return parse_service({"metadata": {"name": name, "namespace": "ns", "uid": name}, "spec": spec})


def test_the_same_model_in_the_same_claim_is_one_job_however_spelled():
    same = {loader_job_name(svc(u, n, r)) for u, n, r in [
        ("org/llama", "a", "v1"), ("hf://org/llama", "b", "v1"), ("org/llama@v1", "c", None),
        ("hf://org/llama@v1", "d", None)]}
    assert len(same) == 1
    others = {loader_job_name(s) for s in [svc("org/llama", revision="v2"), svc("org/llama"),
                                          svc("org/llama", revision="v1", claim="other"), svc("org/llama-2")]}
    assert len(others) == 4 and not others & same
    name = same.pop()
    assert len(name) <= 63 and name.startswith("flotilla-model-")


def test_only_remote_models_in_a_writable_cache_need_a_loader():
    assert needs_loader(svc("org/llama")) and needs_loader(svc("s3://bucket/llama"))
    assert not needs_loader(svc("org/llama", claim=None))
    assert not needs_loader(svc("org/llama", read_only=True))  # the user filled it
    assert not needs_loader(svc("pvc://weights/llama")) and not needs_loader(svc("/models/llama"))


def job(conditions=(), failed=0, start="2026-01-01T00:00:00Z", done=None):
    status = {"startTime": start, "failed": failed,
              "conditions": [{"type": t, "status": "True", "lastTransitionTime": at, "reason": t, "message": m}
                             for t, at, m in conditions]}
    if done:
        status["completionTime"] = done
    return {"metadata": {"name": "j"}, "status": status}


def pod(created: str, phase: str, message: str | None = None):
    state = {"terminated": {"exitCode": 0 if phase == "Succeeded" else 1, "message": message}} if message else {}
    return {"metadata": {"creationTimestamp": created},
            "status": {"phase": phase, "containerStatuses": [{"name": "download", "state": state}]}}


def test_pending_then_downloading_then_ready_with_what_the_loader_reported():
    assert cache_state("j", None, [], NOW).phase == "Pending"
    assert cache_state("j", job(), [pod("2026-01-01T00:00:01Z", "Pending")], NOW).phase == "Pending"
    assert cache_state("j", job(), [pod("2026-01-01T00:00:01Z", "Running")], NOW).phase == "Downloading"
    report = json.dumps({"path": "/model-cache/hub/x", "bytes": 123, "seconds": 4.5})
    done = cache_state("j", job([("Complete", "2026-01-01T00:01:00Z", "")], done="2026-01-01T00:01:00Z"),
                       [pod("2026-01-01T00:00:01Z", "Succeeded", report)], NOW)
    assert done.ready and (done.bytes, done.seconds, done.path) == (123, 4.5, "/model-cache/hub/x")
    # pods cleaned away: the Job's own times still give the seconds
    bare = cache_state("j", job([("Complete", "x", "")], done="2026-01-01T00:01:00Z"), [], NOW)
    assert bare.ready and bare.seconds == 60 and bare.bytes is None


def test_a_failed_attempt_shows_the_loaders_error_while_the_job_retries():
    error = json.dumps({"error": "model: repo org/x was not found on https://huggingface.co (check the name)"})
    state = cache_state("j", job(failed=1), [pod("2026-01-01T00:00:01Z", "Failed", error),
                                             pod("2026-01-01T00:00:30Z", "Pending")], NOW)
    assert state.phase == "Failed" and "was not found" in state.message and "retrying" in state.message
    assert not state.retry
    # a crash before the report: the log's last line (FallbackToLogsOnError) is the reason
    crashed = cache_state("j", job(failed=1), [pod("2026-01-01T00:00:01Z", "Failed", "Traceback\nMemoryError")], NOW)
    assert "MemoryError" in crashed.message


@pytest.mark.parametrize("age, retry", [(RETRY_FAILED_AFTER_SECONDS - 1, False), (RETRY_FAILED_AFTER_SECONDS, True)])
def test_a_job_that_failed_for_good_is_replaced_after_a_while(age, retry):
    import datetime

    failed_at = (datetime.datetime(2026, 1, 1, 0, 10, tzinfo=datetime.timezone.utc)
                 - datetime.timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
    error = json.dumps({"error": "model: revision 'v9' of org/x does not exist"})
    state = cache_state("j", job([("Failed", failed_at, "Job has reached the specified backoff limit")], failed=5),
                        [pod("2026-01-01T00:00:01Z", "Failed", error)], NOW)
    assert state.phase == "Failed" and "revision 'v9'" in state.message and state.retry is retry
