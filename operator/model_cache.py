"""The shared model cache: which loader Job fills a claim, and what its Job and pods say. Pure functions.

With `spec.modelCache` a ReadWriteMany claim holds downloaded weights for every replica. One loader Job per
(model, revision, claim) — named from a hash of the three, so two InferenceServices serving the same model find the
same Job — runs `flotilla download` from the engine image into the claim; each InferenceService that uses it is one
of its owners, so garbage collection deletes it only with the last of them. Engine pods start only once it has
succeeded, and then read the claim read-only with HF_HUB_OFFLINE=1. The Job's pods write one JSON line to their
termination message (`flotilla download --report`): the folder, bytes and seconds, or the error, which this module
turns into the `ModelCached` condition and `status.modelCache`.
"""
from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from flotilla.operator.spec import InferenceService

#: Where engine pods and the loader mount the claim, and the layout in it (the hub's cache, Flotilla's own).
MOUNT = "/model-cache"
HUB_CACHE = f"{MOUNT}/hub"
FLOTILLA_CACHE = f"{MOUNT}/flotilla"
#: Label on the loader's pods (and the Job) naming the Job, to find its pods.
LOADER_LABEL = "flotilla.dev/model-loader"
#: Pod retries inside one Job (the Job controller's exponential back-off, 10 s doubling to 6 min).
BACKOFF_LIMIT = 4
#: A Job that failed for good is replaced by a fresh one after this long (the operator's own back-off).
RETRY_FAILED_AFTER_SECONDS = 300


def needs_loader(svc: InferenceService) -> bool:
    """A loader Job fills the cache for remote models; a readOnly cache is the user's, filled by them."""
    cache = svc.model_cache
    return cache is not None and not cache.read_only and svc.model.source in ("hf", "s3")


def cache_key(svc: InferenceService) -> tuple[str, str, str]:
    """(model, revision, claim), with `hf://` and an inline `@REV` normalised away: the same weights in the same
    claim give the same key however the URI spells them."""
    assert svc.model_cache is not None
    uri, revision = svc.model.uri.removeprefix("hf://"), svc.model.revision or ""
    if svc.model.source == "hf" and "@" in uri:
        uri, revision = uri.split("@", 1)
    return uri, revision, svc.model_cache.claim_name


def loader_job_name(svc: InferenceService) -> str:
    digest = hashlib.sha256("\n".join(cache_key(svc)).encode()).hexdigest()[:12]
    return f"flotilla-model-{digest}"


@dataclass(frozen=True)
class CacheState:
    """Where the shared cache of one model stands. `phase` is the ModelCached condition's reason."""

    job: str
    phase: str  # "Pending" | "Downloading" | "Ready" | "Failed"
    message: str
    bytes: int | None = None
    seconds: float | None = None
    path: str | None = None
    #: The Job failed for good long enough ago: delete it, and a fresh one starts.
    retry: bool = False

    @property
    def ready(self) -> bool:
        return self.phase == "Ready"

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job": self.job, "phase": self.phase}
        for key, value in (("bytes", self.bytes), ("seconds", self.seconds), ("path", self.path)):
            if value is not None:
                out[key] = value
        return out


def _time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)


def _report(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    """The loader's JSON line from a finished pod's termination message (or its last log line, as an error)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        terminated = (cs.get("state") or {}).get("terminated") or {}
        message = (terminated.get("message") or "").strip()
        if not message:
            continue
        try:
            report = json.loads(message.splitlines()[-1])
        except ValueError:
            report = None
        return report if isinstance(report, dict) else {"error": message.splitlines()[-1]}
    return None


def _created(pod: Mapping[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("creationTimestamp") or ""


def cache_state(name: str, job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]],
                now: str) -> CacheState:
    """The cache's state from its loader Job and the Job's pods (oldest to newest in any order)."""
    if job is None:
        return CacheState(name, "Pending", f"creating loader Job {name}")
    st = job.get("status") or {}
    conditions = {c.get("type"): c for c in st.get("conditions") or () if c.get("status") == "True"}
    pods = sorted(pods, key=_created)
    reports = [r for p in pods if (r := _report(p)) is not None]  # oldest first
    if "Complete" in conditions:
        report = next((r for r in reversed(reports) if "error" not in r), {})
        started, completed = _time(st.get("startTime")), _time(st.get("completionTime"))
        seconds = report.get("seconds")
        if seconds is None and started and completed:
            seconds = (completed - started).total_seconds()
        return CacheState(name, "Ready", f"loader Job {name} cached the model", report.get("bytes"), seconds,
                          report.get("path"))
    error = next((r["error"] for r in reversed(reports) if "error" in r), None)
    failed = int(st.get("failed") or 0)
    if "Failed" in conditions:
        since = _time(conditions["Failed"].get("lastTransitionTime"))
        retry = since is not None and (_time(now) - since).total_seconds() >= RETRY_FAILED_AFTER_SECONDS
        cause = error or conditions["Failed"].get("message") or conditions["Failed"].get("reason", "failed")
        return CacheState(name, "Failed", f"loader Job {name} failed after {failed} attempts: {cause}; a new "
                          f"Job starts {RETRY_FAILED_AFTER_SECONDS} s after the failure", retry=retry)
    if failed and error:
        return CacheState(name, "Failed", f"attempt {failed} of loader Job {name} failed: {error}; retrying "
                          "with back-off")
    running = any((p.get("status") or {}).get("phase") == "Running" for p in pods)
    if running:
        return CacheState(name, "Downloading", f"loader Job {name} is downloading the model")
    return CacheState(name, "Pending", f"loader Job {name} is waiting for its pod to start")
