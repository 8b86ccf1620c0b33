"""A real single-node Kubernetes (e2e/node/): the project's own images run under a real kubelet, from
`kubectl apply -k manifests/` to a chat through the Service, autoscaling, a rolling update and deletion.

Every step is asserted from the cluster's own state (kubectl) and a real client (the openai SDK). The images are
those `make test` builds from Dockerfile.engine and Dockerfile.operator (e2e/node/build-project-images.sh);
the node is started here and stopped at the end. Where the node cannot start (not root, no containerd, a build
that failed) these tests FAIL with the reason: they never skip.

    make node && .venv/bin/pytest -q tests/test_node.py
    FLOTILLA_NODE_KEEP=1 keeps the node running afterwards; FLOTILLA_NODE_REUSE=1 runs on such a node.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import wait_for
from flotilla.engine.model_source import ALLOW_PATTERNS

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = Path(os.environ.get("FLOTILLA_NODE_DIR", Path.home() / ".cache/flotilla/node"))
KUBECTL = Path.home() / ".cache/flotilla/controlplane/v1.32.0/bin/kubectl"
KUBECONFIG = NODE_DIR / "run/admin.kubeconfig"
SAMPLE = ROOT / "manifests/samples/smollm2-cpu.yaml"
NAME, NS = "smollm2", "default"
ENGINE = {"app.kubernetes.io/name": "flotilla-engine", "app.kubernetes.io/instance": NAME}

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]


def sh(*cmd: str | Path, timeout: float = 300, check: bool = True, input: str | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, input=input)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done.stdout


def kubectl(*args: str, timeout: float = 300, check: bool = True, input: str | None = None) -> str:
    return sh(KUBECTL, "--kubeconfig", KUBECONFIG, *args, timeout=timeout, check=check, input=input)


def get(kind: str, name: str = "", ns: str = NS, selector: dict[str, str] | None = None) -> Any:
    args = ["get", kind, *([name] if name else []), "-n", ns, "-o", "json"]
    if selector:
        args += ["-l", ",".join(f"{k}={v}" for k, v in selector.items())]
    return json.loads(kubectl(*args))


def isvc() -> dict[str, Any]:
    return get("inferenceservice", NAME)


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or () if c["type"] == kind), {})


def ready_pods(instance: str = NAME) -> list[dict[str, Any]]:
    pods = get("pods", selector={**ENGINE, "app.kubernetes.io/instance": instance})["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")
            and condition(p, "Ready").get("status") == "True"]


def log_tails() -> str:
    logs = NODE_DIR / "logs"
    return "\n".join(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
                     for f in sorted(logs.glob("*.log")))


def explain_failure() -> str:
    """The cluster's state when a test here fails (conftest puts it at the head of the report): the pods, each
    container's restarts and last termination, recent events, the InferenceServices' conditions, and the tails of
    the engine's and operator's logs. CI shows only an excerpt of the output, so this comes first and stays short."""
    if not node_ready():
        return f"node state: the node is not Ready\n{log_tails()}"
    node = json.loads(kubectl("get", "node", "flotilla-node", "-o", "json", check=False, timeout=30) or "{}")
    pressure = [f"{c['type']}={c['status']}" for c in (node.get("status") or {}).get("conditions") or ()]
    taints = [t["key"] for t in (node.get("spec") or {}).get("taints") or ()]
    out = [f"node state: {' '.join(pressure)} taints={taints}",
           kubectl("get", "pods", "-A", "-o", "wide", check=False, timeout=30).rstrip()]
    pods = json.loads(kubectl("get", "pods", "-A", "-o", "json", check=False, timeout=30) or '{"items": []}')
    for pod in pods["items"]:
        name = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        for c in (pod.get("status") or {}).get("containerStatuses") or ():
            last = (c.get("lastState") or {}).get("terminated")
            if c.get("restartCount") or last or not c.get("ready"):
                out.append(f"{name} [{c['name']}]: ready={c.get('ready')} restarts={c.get('restartCount')} "
                           f"state={json.dumps(c.get('state'))} last={json.dumps(last)}")
    for svc in json.loads(kubectl("get", "inferenceservices", "-A", "-o", "json", check=False, timeout=30)
                          or '{"items": []}')["items"]:
        st = svc.get("status") or {}
        conds = "; ".join(f"{c['type']}={c['status']} {c.get('reason', '')}: {c.get('message', '')}"
                          for c in st.get("conditions") or ())
        out.append(f"isvc {svc['metadata']['name']}: {conds} | autoscaler={json.dumps(st.get('autoscaler'))}"[:800])
    events = kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", "-o",
                     "custom-columns=AT:.lastTimestamp,OBJ:.involvedObject.name,REASON:.reason,MSG:.message",
                     check=False, timeout=30).splitlines()
    out += ["events (last 15):", *(line[:300] for line in events[-15:])]
    for selector, ns, tail in ((ENGINE, NS, "15"), ({"app.kubernetes.io/name": "flotilla-operator"},
                                                    "flotilla-system", "10")):
        label = ",".join(f"{k}={v}" for k, v in selector.items())
        for previous in ("false", "true"):
            text = kubectl("logs", "-n", ns, "-l", label, f"--previous={previous}", f"--tail={tail}",
                           "--prefix", "--all-containers", check=False, timeout=30).rstrip()
            if text:
                out += [f"logs {label}{' (previous)' if previous == 'true' else ''}:",
                        *(line[:300] for line in text.splitlines())]
    return "\n".join(out)


def why_no_node() -> str | None:
    if os.geteuid() != 0:
        return "the node needs root (containerd, kubelet, iptables): run the suite as root"
    failed = NODE_DIR / "build-failed.txt"
    if failed.exists():
        return f"`make node` failed: {failed.read_text().strip()}"
    for need in (KUBECTL, NODE_DIR / "bin/kubelet", NODE_DIR / "pause.oci.tar", NODE_DIR / "images/engine.tar",
                 NODE_DIR / "images/operator.tar"):
        if not need.exists():
            return f"{need} is missing: run `make node` (e2e/node/README.md)"
    return None


def node_ready() -> bool:
    return kubectl("get", "node", "flotilla-node", "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                   check=False) == "True"


@pytest.fixture(scope="module")
def node():
    reason = why_no_node()
    if reason:
        pytest.fail(reason, pytrace=False)
    if os.environ.get("FLOTILLA_NODE_REUSE") == "1" and KUBECONFIG.exists() and node_ready():
        yield  # a node left running by FLOTILLA_NODE_KEEP=1 (iterating on the scenario)
        return
    sh("bash", ROOT / "e2e/node/down.sh", timeout=180, check=False)  # whatever an interrupted run left
    try:
        out = sh("bash", ROOT / "e2e/node/up.sh", timeout=600, check=False)
        try:
            wait_for(node_ready, timeout=120, what="the node to be Ready")
        except AssertionError as e:
            pytest.fail(f"the node did not start: {e}\nup.sh said:\n{out[-2000:]}\n{log_tails()}", pytrace=False)
        yield
    finally:
        if os.environ.get("FLOTILLA_NODE_KEEP") != "1":
            sh("bash", ROOT / "e2e/node/down.sh", timeout=300, check=False)


# --- streaming clients ----------------------------------------------------------------------------

def client(base_url: str):
    import openai

    # No retries: a request the fleet drops must show as a failure here, not be papered over.
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


class Streamer(threading.Thread):
    """Streams short chats back to back through `base_url` until stopped; records every outcome."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.api = client(base_url)
        self.done = threading.Event()
        self.completed = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.done.is_set():
            try:
                stream = self.api.chat.completions.create(
                    model=NAME, max_tokens=24, stream=True, temperature=0,
                    messages=[{"role": "user", "content": "Count from one to ten."}])
                finish = None
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                if finish in ("stop", "length"):
                    self.completed += 1
                else:
                    self.failures.append(f"stream ended without a finish_reason (got {finish!r})")
            except Exception as e:  # noqa: BLE001  (every kind of failure counts)
                self.failures.append(f"{type(e).__name__}: {e}")

    def stop(self) -> "Streamer":
        self.done.set()
        self.join(timeout=180)
        return self


def service_url() -> str:
    ip = get("service", NAME)["spec"]["clusterIP"]
    return f"http://{ip}:8000/v1"


# --- the scenario, in order ---------------------------------------------------------------------------

def test_one_apply_installs_the_operator_which_runs_under_its_own_rbac(node):
    kubectl("apply", "-k", str(ROOT / "manifests"))  # once, on an empty cluster: must not need a second try
    kubectl("-n", "flotilla-system", "rollout", "status", "deployment/flotilla-operator", "--timeout=300s",
            timeout=320)
    def operator_pods() -> list[dict[str, Any]]:
        pods = get("pods", ns="flotilla-system", selector={"app.kubernetes.io/name": "flotilla-operator"})["items"]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    assert operator_pods() and all(p["spec"]["serviceAccountName"] == "flotilla-operator" for p in operator_pods())

    # The operators reached the API from their pods, as their ServiceAccount: they made their peering object
    # and registered in it (kopf writes each live peer, named by POD_ID, into its status).
    def registered() -> bool:
        peering = json.loads(kubectl("get", "clusterkopfpeering", "flotilla", "-o", "json", check=False) or "{}")
        names = {p["metadata"]["name"] for p in operator_pods()}
        return len(names) == 2 and names <= set(peering.get("status") or {})

    wait_for(registered, timeout=120, what="both operator replicas in their peering object")


def test_the_cpu_sample_becomes_ready_with_facts_from_the_live_pod(node):
    # The sample as shipped, except: two replicas must fit this 2-core node beside the operator, and the
    # builtin autoscaler is switched on (a low KV target so that a bounded load must add a replica).
    sample = yaml.safe_load(SAMPLE.read_text())
    sample["spec"]["resources"]["cpu"] = "500m"
    sample["spec"]["autoscaling"] = {"enabled": True, "minReplicas": 1, "maxReplicas": 2,
                                     "targetKVCacheUtilization": 0.02, "scaleUpStabilizationSeconds": 0,
                                     "scaleDownStabilizationSeconds": 20}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(sample))
    wait_for(lambda: condition(isvc(), "Ready").get("status") == "True", timeout=600,
             what="the InferenceService to be Ready")
    pod = ready_pods()[0]
    engine = pod["spec"]["containers"][0]
    assert engine["image"] == sample["spec"]["image"]
    assert pod["spec"]["securityContext"].get("runAsNonRoot") is True
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["spec"]["volumes"])  # /dev/shm
    # The image's prebuilt CPU kernels load on this node's CPU (no compiler in the image to fall back on).
    log = kubectl("logs", "-n", NS, pod["metadata"]["name"], "-c", engine["name"])
    assert "attention cpu" in log and "kernels unavailable" not in log, log[-2000:]
    # The engine facts the operator scraped from the pod's /metrics.
    facts = wait_for(lambda: (isvc()["status"].get("engine") or None), timeout=120, what="engine facts in status")
    assert facts["maxModelLen"] == sample["spec"]["engine"]["maxModelLen"]
    assert facts["numGpuBlocks"] > 0 and facts["modelLoadSeconds"] > 0 and facts["modelName"] == NAME


def test_chat_through_the_cluster_ip_and_through_port_forward(node):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    via_service = client(service_url()).chat.completions.create(model=NAME, messages=messages, max_tokens=16,
                                                                temperature=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    forward = subprocess.Popen([str(KUBECTL), "--kubeconfig", str(KUBECONFIG), "-n", NS, "port-forward",
                                f"svc/{NAME}", f"{port}:8000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        assert "Forwarding from" in (forward.stdout.readline() or ""), "kubectl port-forward did not start"
        via_forward = client(f"http://127.0.0.1:{port}/v1").chat.completions.create(
            model=NAME, messages=messages, max_tokens=16, temperature=0)
    finally:
        forward.terminate()
        forward.wait(timeout=30)
    assert via_service.usage.completion_tokens > 0 and via_service.choices[0].message.content
    # Greedy decoding: the same model behind both paths gives the same answer.
    assert via_forward.choices[0].message.content == via_service.choices[0].message.content


def test_autoscaler_adds_a_replica_under_load_and_removes_it_with_no_failed_stream(node):
    api = client(service_url())

    def long_request(_: int) -> None:
        api.completions.create(model=NAME, prompt="Tell a long story about the sea. " * 40, max_tokens=300,
                               extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(max_workers=8) as pool:
        load = [pool.submit(long_request, i) for i in range(16)]
        wait_for(lambda: len(ready_pods()) == 2, timeout=600,
                 what=f"a second Ready replica under load (status: {isvc().get('status', {}).get('autoscaler')})")
        for f in load:
            f.result()
    # Load over: the fleet scales back to one while a client keeps streaming through the Service.
    streamer = Streamer(service_url())
    streamer.start()
    try:
        wait_for(lambda: isvc()["spec"].get("replicas") == 1, timeout=300, what="the autoscaler to scale down")
        wait_for(lambda: len(get("pods", selector=ENGINE)["items"]) == 1, timeout=300,
                 what="the removed replica to finish draining")
    finally:
        streamer.stop()
    assert streamer.failures == [] and streamer.completed > 0, streamer.failures[:5]


def test_a_rolling_update_loses_no_stream(node):
    before = {p["metadata"]["name"] for p in get("pods", selector=ENGINE)["items"]}
    streamer = Streamer(service_url())
    streamer.start()
    try:
        kubectl("patch", "inferenceservice", NAME, "--type", "merge", "-p",
                json.dumps({"spec": {"engine": {"maxNumSeqs": 12}}}))

        def rolled() -> bool:
            pods = get("pods", selector=ENGINE)["items"]
            names = {p["metadata"]["name"] for p in pods}
            return bool(names) and not names & before and all(
                condition(p, "Ready").get("status") == "True" for p in pods)

        wait_for(rolled, timeout=600, what="every engine pod replaced and Ready")
        wait_for(lambda: condition(isvc(), "Ready").get("status") == "True", timeout=120, what="Ready again")
    finally:
        streamer.stop()
    assert streamer.failures == [] and streamer.completed > 0, streamer.failures[:5]
    pod = get("pods", selector=ENGINE)["items"][0]
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--max-num-seqs") + 1] == "12"


def test_a_deleted_pod_and_a_deleted_service_come_back(node):
    old_pod = ready_pods()[0]["metadata"]["name"]
    old_svc = get("service", NAME)["metadata"]["uid"]
    kubectl("delete", "pod", old_pod, "-n", NS, "--wait=false")
    kubectl("delete", "service", NAME, "-n", NS)
    wait_for(lambda: get("service", NAME)["metadata"]["uid"] != old_svc, timeout=120, what="the Service recreated")
    wait_for(lambda: [p for p in ready_pods() if p["metadata"]["name"] != old_pod], timeout=300,
             what="a replacement pod Ready")
    reply = client(service_url()).chat.completions.create(model=NAME, max_tokens=8,
                                                          messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_an_idle_service_scales_to_zero_and_the_router_brings_it_back_for_a_held_request(node):
    """minReplicas 0: after scaleToZeroAfterSeconds without a request the operator scales the service to zero (Ready
    stays True: the router will wake it). A chat sent to the namespace's router (rendered by the operator, named
    in status.routerURL) is held while the router asks for a replica, and answered once the pod is Ready."""
    import time

    kubectl("patch", "inferenceservice", NAME, "--type", "merge", "-p", json.dumps(
        {"spec": {"autoscaling": {"minReplicas": 0, "scaleToZeroAfterSeconds": 30}}}))
    router = f"http://flotilla-router.{NS}.svc:8000/v1"
    assert wait_for(lambda: isvc()["status"].get("routerURL"), timeout=60, what="status.routerURL") == router
    kubectl("rollout", "status", "deployment/flotilla-router", "-n", NS, "--timeout=300s", timeout=320)
    wait_for(lambda: isvc()["spec"].get("replicas") == 0, timeout=300,
             what=f"the idle service to scale to zero (autoscaler: {isvc().get('status', {}).get('autoscaler')})")
    wait_for(lambda: get("pods", selector=ENGINE)["items"] == [], timeout=300, what="the last engine pod to go")
    ready = condition(isvc(), "Ready")
    assert (ready.get("status"), ready.get("reason")) == ("True", "ScaledToZero")
    ip = get("service", "flotilla-router")["spec"]["clusterIP"]
    start = time.monotonic()
    reply = client(f"http://{ip}:8000/v1").with_options(timeout=600).chat.completions.create(
        model=NAME, max_tokens=8, messages=[{"role": "user", "content": "Are you awake?"}])
    cold_start = time.monotonic() - start
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert isvc()["spec"]["replicas"] == 1 and len(ready_pods()) == 1
    print(f"scale from zero through the router on the node: first answer after {cold_start:.1f}s")


def test_deleting_the_service_removes_everything_it_owned(node):
    kubectl("delete", "inferenceservice", NAME, "-n", NS, "--wait=true", timeout=300)
    for kind in ("deployment", "service", "poddisruptionbudget"):
        wait_for(lambda: kubectl("get", kind, NAME, "-n", NS, "--ignore-not-found", "-o", "name") == "",
                 timeout=120, what=f"the {kind} to be garbage-collected")
    wait_for(lambda: get("pods", selector=ENGINE)["items"] == [], timeout=300, what="the engine pods to be gone")


# --- a shared model cache, filled once by a loader Job from a hub ------------------------------------------

NODE_IP = "10.254.0.1"  # e2e/node/up.sh: the node's address, on which pods reach the host
TINY = "flotilla-test/tiny-llama"
CACHE_CLAIM = "shared-models"


@pytest.fixture(scope="module")
def adapters_of_tiny(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Two PEFT LoRA adapters of the tiny model, served by the hub stand-in as repos of their own."""
    from lora_fixtures import build_adapter

    return {name: build_adapter(tiny_llama, tmp_path_factory.mktemp(name), seed, rank=8)
            for name, seed in (("sql-lora", 21), ("chat-lora", 22))}


@pytest.fixture(scope="module")
def hub_for_pods(tiny_llama, adapters_of_tiny):
    """The hub stand-in on the node's address: the loader Job's pod downloads from it through HF_ENDPOINT, the
    engines their adapters."""
    from hub_standin import HubStandIn, Repo

    hub = HubStandIn({TINY: Repo({"main": tiny_llama}),
                      **{f"flotilla-test/{name}": Repo({"main": folder}) for name, folder in adapters_of_tiny.items()}}
                     ).start(host=NODE_IP)
    yield hub
    hub.stop()


def shared_cache_claim(folder: Path) -> str:
    """A hostPath PersistentVolume (this node has no provisioner) and a ReadWriteMany claim bound to it."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o777)  # the loader runs as uid 1000; hostPath ignores fsGroup
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{CACHE_CLAIM}-pv"},
          "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                   "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(folder), "type": "Directory"}}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CACHE_CLAIM, "namespace": NS},
           "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": f"{CACHE_CLAIM}-pv",
                    "resources": {"requests": {"storage": "1Gi"}}}}
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all([pv, pvc]))
    return CACHE_CLAIM


def cached_service(name: str, hub_url: str) -> dict[str, Any]:
    sample = yaml.safe_load(SAMPLE.read_text())
    spec = sample["spec"]
    spec["model"] = {"uri": TINY, "servedModelName": "tiny"}
    spec["modelCache"] = {"claimName": CACHE_CLAIM}
    spec["env"] = [{"name": "HF_ENDPOINT", "value": hub_url}]
    spec["engine"] = {"maxModelLen": 256, "maxNumSeqs": 4, "dtype": "float32"}
    spec["resources"]["cpu"] = "500m"
    spec["drainSeconds"] = 5
    return {**sample, "metadata": {"name": name, "namespace": NS}}


def test_one_loader_job_fills_a_shared_cache_that_two_services_serve_from_offline(node, hub_for_pods, tiny_llama,
                                                                                  tmp_path_factory):
    from flotilla.engine import LLM, SamplingParams

    shared_cache_claim(tmp_path_factory.mktemp("shared-model-cache"))
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all([cached_service(n, hub_for_pods.url)
                                                         for n in ("tiny-a", "tiny-b")]))
    for name in ("tiny-a", "tiny-b"):
        wait_for(lambda: condition(get("inferenceservice", name), "Ready").get("status") == "True", timeout=600,
                 what=f"{name} Ready (loader Job, then the engine from the cache)")
    jobs = get("jobs", selector={"app.kubernetes.io/component": "model-loader"})["items"]
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
    job = jobs[0]
    assert sorted(r["name"] for r in job["metadata"]["ownerReferences"]) == ["tiny-a", "tiny-b"]
    assert job["status"].get("succeeded") == 1

    # What the loader reported, as the status says: the served files, all of them, once.
    expected = {p.relative_to(tiny_llama).as_posix(): p.stat().st_size for p in tiny_llama.rglob("*")
                if p.is_file() and any(fnmatch(p.name, pattern) for pattern in ALLOW_PATTERNS)}
    for name in ("tiny-a", "tiny-b"):
        status = get("inferenceservice", name)["status"]
        assert condition({"status": status}, "ModelCached")["status"] == "True"
        assert status["modelCache"]["job"] == job["metadata"]["name"]
        assert status["modelCache"]["bytes"] == sum(expected.values())
    downloads = [p.split("/resolve/", 1)[1].split("/", 1)[1] for p in hub_for_pods.downloads()]
    assert sorted(downloads) == sorted(expected)  # each file once: the engines downloaded nothing

    # Both fleets serve the cached weights: greedy output equals the model's own, loaded here from its folder.
    local = LLM(str(tiny_llama), dtype="float32").generate(
        {"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text
    for name in ("tiny-a", "tiny-b"):
        pod = ready_pods(name)[0]
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["HF_HUB_OFFLINE"] == "1"
        ip = get("service", name)["spec"]["clusterIP"]
        reply = client(f"http://{ip}:8000/v1").completions.create(
            model="tiny", prompt=[5, 6, 7, 8], max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        assert reply.choices[0].text == local

    # Deleting one service leaves the Job (and the cache) to the other; the last one takes the Job along.
    kubectl("delete", "inferenceservice", "tiny-a", "-n", NS, "--wait=true", timeout=300)
    wait_for(lambda: [r["name"] for r in get("job", job["metadata"]["name"])["metadata"]["ownerReferences"]]
             == ["tiny-b"], timeout=120, what="the loader Job owned by tiny-b alone")
    kubectl("delete", "inferenceservice", "tiny-b", "-n", NS, "--wait=true", timeout=300)
    wait_for(lambda: kubectl("get", "job", job["metadata"]["name"], "-n", NS, "--ignore-not-found", "-o", "name")
             == "", timeout=120, what="the loader Job gone with its last owner")


# --- LoRA adapters loaded into running engines ----------------------------------------------------------

def test_adapters_are_loaded_into_the_running_engine_and_changed_without_a_restart(node, hub_for_pods, tiny_llama,
                                                                                   adapters_of_tiny, tokenizer):
    """spec.adapters from the hub: the pod turns Ready only once the operator has loaded them (its readiness gate);
    a request's model picks the adapter and its greedy output is peft's (the adapter merged); adding one adapter and
    dropping another changes what the same pod serves, with no restart."""
    import openai
    from lora_fixtures import peft_greedy

    name = "tiny-lora"
    body = cached_service(name, hub_for_pods.url)
    body["spec"].pop("modelCache")  # the engine downloads the model itself
    body["spec"]["adapters"] = [{"name": "sql", "uri": "flotilla-test/sql-lora"}]
    body["spec"]["lora"] = {"maxLoras": 2, "maxLoraRank": 8}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(body))

    def status() -> dict[str, Any]:
        return get("inferenceservice", name).get("status") or {}

    wait_for(lambda: condition(get("inferenceservice", name), "Ready").get("status") == "True", timeout=600,
             what=f"{name} Ready (model and adapter downloaded, adapter loaded: {status().get('adapters')})")
    [pod] = ready_pods(name)
    assert condition(pod, "flotilla.dev/adapters-loaded").get("status") == "True"
    wait_for(lambda: [a.get("readyReplicas") for a in status().get("adapters") or ()] == [1], timeout=120,
             what="status.adapters to count the pod")
    api = client(f"http://{get('service', name)['spec']['clusterIP']}:8000/v1")
    prompt = [1, 1000, 23, 4, 511, 98, 12, 3, 17]

    def ask(model: str) -> str:
        reply = api.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                       extra_body={"min_tokens": 8})
        return reply.choices[0].text

    def want(adapter: str) -> str:
        return tokenizer.decode(peft_greedy(tiny_llama, adapters_of_tiny[adapter], prompt, 8), skip_special_tokens=True)

    def served() -> dict[str, str | None]:
        """What the Service's engines list ({} while the Service does not answer yet: a Ready pod reaches its
        endpoints and kube-proxy's rules a moment later)."""
        try:
            return {m.id: m.parent for m in api.models.list().data}
        except openai.APIConnectionError:
            return {}

    wait_for(lambda: served().get("sql") == "tiny", timeout=120, what=f"the Service to list sql ({served()})")
    assert ask("sql") == want("sql-lora")

    uid = pod["metadata"]["uid"]
    kubectl("patch", "inferenceservice", name, "--type", "merge", "-p", json.dumps(
        {"spec": {"adapters": [{"name": "chat", "uri": "flotilla-test/chat-lora"}]}}))
    wait_for(lambda: set(served()) == {"tiny", "chat"}, timeout=180,
             what=f"the pod to serve chat alone (status: {status().get('adapterPods')})")
    assert ask("chat") == want("chat-lora")
    [same] = ready_pods(name)
    assert same["metadata"]["uid"] == uid and same["status"]["containerStatuses"][0]["restartCount"] == 0
    wait_for(lambda: status().get("adapterPods") == [{"pod": same["metadata"]["name"], "loaded": ["chat"]}],
             timeout=120, what="status.adapterPods to show the change")
    kubectl("delete", "inferenceservice", name, "-n", NS, "--wait=true", timeout=300)
