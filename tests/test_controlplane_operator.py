"""The operator against a real kube-apiserver + kube-controller-manager + etcd (tests/controlplane.py):
the CRD as the API server sees it (schema, CEL, defaults), and the real operator process reconciling,
repairing, scaling, surviving restarts and being garbage-collected. No nodes: pods stay Pending, which is
all the children need."""
from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from controlplane import ControlPlane, die_with_parent, control_plane, free_port, wait_for  # noqa: F401  (fixture)
from flotilla.operator.render import GROUP, VERSION, render_children
from flotilla.operator.spec import parse_service
from operator_fixtures.oracle import admit
from test_operator_crd import INVALID, VALID_EDGES, minimal, sample_services

pytestmark = pytest.mark.controlplane

PLURAL = "inferenceservices"
NS = "flotilla-it"
IMAGE = "registry.local/engine:it"


# --- clients ----------------------------------------------------------------------------------------

class Kube:
    """The few calls the tests make, on the official client, returning plain dicts."""

    def __init__(self, cp: ControlPlane) -> None:
        import kubernetes

        self.client = cp.api_client()
        self.k = kubernetes.client
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.apps = kubernetes.client.AppsV1Api(self.client)
        self.policy = kubernetes.client.PolicyV1Api(self.client)
        self.batch = kubernetes.client.BatchV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.ext = kubernetes.client.ApiextensionsV1Api(self.client)
        self.ApiException = kubernetes.client.exceptions.ApiException

    def plain(self, obj: Any) -> dict[str, Any]:
        return self.client.sanitize_for_serialization(obj)

    def create_isvc(self, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        ns = body["metadata"].get("namespace", NS)
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body,
                                                           dry_run="All" if dry_run else None)

    def isvc(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)

    def patch_isvc(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name, patch)

    def deployment(self, name: str) -> dict[str, Any]:
        return self.plain(self.apps.read_namespaced_deployment(name, NS))

    def exists(self, read: Callable[..., Any], name: str) -> bool:
        try:
            read(name, NS)
            return True
        except self.ApiException as e:
            if e.status == 404:
                return False
            raise


def kube_with_namespace(control_plane: ControlPlane, namespace: str) -> Kube:  # noqa: F811
    kube = Kube(control_plane)
    try:
        kube.core.create_namespace({"metadata": {"name": namespace}})
    except kube.ApiException as e:
        if e.status != 409:
            raise
    return kube


@pytest.fixture(scope="module")
def kube(control_plane: ControlPlane) -> Kube:  # noqa: F811
    return kube_with_namespace(control_plane, NS)


class Operator:
    """`python -m flotilla.operator` as its own process, pointed at the test control plane."""

    started: list["Operator"] = []

    def __init__(self, cp: ControlPlane, *extra: str, env: dict[str, str] | None = None) -> None:
        self.cp, self.extra, self.env = cp, extra, env or {}
        self.proc: subprocess.Popen | None = None
        Operator.started.append(self)
        self.log_path = Path(tempfile.mkstemp(prefix="flotilla-operator-", suffix=".log")[1])

    def start(self) -> "Operator":
        env = dict(os.environ, KUBECONFIG=str(self.cp.kubeconfig), FLOTILLA_ENGINE_IMAGE=IMAGE,
                   FLOTILLA_SCRAPE_INTERVAL_SECONDS="3", FLOTILLA_SCRAPE_TIMEOUT_SECONDS="1", **self.env)
        for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            env.pop(var, None)  # never mistake the test machine for a pod
        log = open(self.log_path, "ab")
        # cwd outside the repo: its top-level operator/ and flotilla/ must not shadow the installed package.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flotilla.operator", "--namespace", NS, "--liveness-port", str(free_port()),
             "--metrics-port", str(free_port()), *self.extra],
            env=env, cwd=tempfile.gettempdir(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent)
        log.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def operator(control_plane: ControlPlane, kube: Kube):  # noqa: F811
    op = Operator(control_plane, "--standalone").start()
    yield op
    op.stop()
    if not os.environ.get("FLOTILLA_KEEP_OPERATOR_LOG"):
        for started in Operator.started:
            started.log_path.unlink(missing_ok=True)


def cpu_service(name: str, replicas: int = 2, **engine: Any) -> dict[str, Any]:
    """The CPU sample under another name: no GPUs, so the fit check needs no nodes. Without its spec.image, so
    that the operator's default (FLOTILLA_ENGINE_IMAGE) applies."""
    body = copy.deepcopy(next(b for n, b in sample_services() if n == "smollm2-cpu.yaml"))
    body["spec"].pop("image", None)
    body["metadata"] = {"name": name, "namespace": NS}
    body["spec"]["replicas"] = replicas
    body["spec"]["engine"].update(engine)
    return body


def owned_by(obj: dict[str, Any], isvc: dict[str, Any]) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r["uid"] == isvc["metadata"]["uid"] and r["kind"] == "InferenceService" and r.get("controller")
               and r.get("blockOwnerDeletion") for r in refs)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def flag(deployment: dict[str, Any], name: str) -> str:
    args = container(deployment)["args"]
    return args[args.index(name) + 1]


def reconciled(kube: Kube, name: str) -> dict[str, Any]:
    """The InferenceService once the operator has written status for its current generation."""
    def check():
        obj = kube.isvc(name)
        st = obj.get("status") or {}
        return obj if st.get("observedGeneration") == obj["metadata"]["generation"] else None
    return wait_for(check, what=f"{name} status.observedGeneration == generation")


# --- the CRD as the API server sees it -------------------------------------------------------------

def test_the_crd_is_established_with_status_and_scale_subresources(kube):
    crd = kube.plain(kube.ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}"))
    conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conds.get("Established") == "True" and conds.get("NamesAccepted") == "True"
    assert "NonStructuralSchema" not in conds
    assert crd["status"]["acceptedNames"]["shortNames"] == ["isvc", "fis"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    # And the peering CRDs kopf needs are served too.
    kube.ext.read_custom_resource_definition("kopfpeerings.kopf.dev")


@pytest.mark.parametrize("name,body", sample_services(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_sample_is_accepted_by_the_api_server(kube, name, body):
    body = copy.deepcopy(body)
    body["metadata"]["namespace"] = NS
    stored = kube.create_isvc(body, dry_run=True)
    parse_service(stored)


@pytest.mark.parametrize("label,spec", VALID_EDGES, ids=[v[0] for v in VALID_EDGES])
def test_edge_values_are_accepted_by_the_api_server(kube, label, spec):
    body = minimal(**copy.deepcopy(spec))
    body["metadata"]["namespace"] = NS
    kube.create_isvc(body, dry_run=True)


@pytest.mark.parametrize("label,mutate,expected", INVALID, ids=[i[0] for i in INVALID])
def test_invalid_specs_are_rejected_by_the_api_server_with_our_messages(kube, label, mutate, expected):
    body = minimal()
    body["metadata"]["namespace"] = NS
    mutate(body)
    with pytest.raises(kube.ApiException) as raised:
        kube.create_isvc(body, dry_run=True)
    assert raised.value.status == 422, raised.value.body
    message = json.loads(raised.value.body)["message"]
    assert expected in message, message


def test_schema_defaults_are_applied_by_the_api_server_as_the_offline_oracle_predicts(kube):
    body = minimal()
    body["metadata"]["namespace"] = NS
    stored = kube.create_isvc(body, dry_run=True)
    predicted, errors = admit(minimal())
    assert errors == []
    assert stored["spec"] == predicted["spec"]
    assert stored["spec"]["replicas"] == 1 and stored["spec"]["autoscaling"]["mode"] == "builtin"


# --- the operator reconciling ----------------------------------------------------------------------

def test_create_makes_deployment_service_and_pdb_owned_by_the_service(kube, operator):
    kube.create_isvc(cpu_service("create"))
    isvc = reconciled(kube, "create")
    dep = wait_for(lambda: kube.deployment("create"), what="Deployment")
    svc = kube.plain(kube.core.read_namespaced_service("create", NS))
    pdb = kube.plain(wait_for(lambda: kube.policy.read_namespaced_pod_disruption_budget("create", NS),
                              what="PodDisruptionBudget"))
    for child in (dep, svc, pdb):
        assert owned_by(child, isvc), child["metadata"]

    # The fields the render tests promise, as the API server stored them.
    children = render_children(parse_service(isvc, IMAGE), isvc["spec"]["model"]["config"])
    rendered = {o["kind"]: o for o in children.objects}
    want = rendered["Deployment"]
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["selector"] == want["spec"]["selector"]
    assert dep["spec"]["strategy"] == want["spec"]["strategy"]
    assert container(dep)["image"] == IMAGE
    assert container(dep)["args"] == container(want)["args"]
    assert container(dep)["resources"] == container(want)["resources"]
    assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert svc["spec"]["selector"] == rendered["Service"]["spec"]["selector"]
    assert svc["spec"]["ports"][0]["port"] == rendered["Service"]["spec"]["ports"][0]["port"]
    assert pdb["spec"]["maxUnavailable"] == 1

    # The controller manager runs the Deployment: a ReplicaSet, and (Pending, nodeless) pods.
    wait_for(lambda: kube.deployment("create").get("status", {}).get("replicas") == 2, what="2 pods")
    st = isvc["status"]
    assert st["endpoint"] and st["selector"]
    assert {c["type"] for c in st["conditions"]} >= {"Ready", "Progressing"}


def test_a_spec_change_updates_the_deployment_and_observed_generation(kube, operator):
    kube.create_isvc(cpu_service("change"))
    before = reconciled(kube, "change")
    assert flag(kube.deployment("change"), "--max-num-seqs") == "16"
    kube.patch_isvc("change", {"spec": {"engine": {"maxNumSeqs": 7}}})
    after = reconciled(kube, "change")
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
    wait_for(lambda: flag(kube.deployment("change"), "--max-num-seqs") == "7",
             what="Deployment args with --max-num-seqs 7")
    # The Deployment controller sees the new template: a new generation, observed.
    def observed() -> bool:
        d = kube.deployment("change")
        return d["status"].get("observedGeneration") == d["metadata"]["generation"]
    wait_for(observed, what="Deployment observedGeneration")
    # Conditions follow: every one for the new generation; pods exist but (nodeless) never get ready, so
    # the fleet is progressing and loading, not ready.
    def conditions() -> dict[str, dict[str, Any]] | None:
        conds = {c["type"]: c for c in kube.isvc("change")["status"]["conditions"]}
        return conds if conds["Ready"]["reason"] == "ModelLoading" else None
    conds = wait_for(conditions, what="Ready=False/ModelLoading")
    assert {c["observedGeneration"] for c in conds.values()} == {after["metadata"]["generation"]}
    assert conds["Ready"]["status"] == "False"
    assert (conds["Progressing"]["status"], conds["Progressing"]["reason"]) in {
        ("True", "RollingOut"), ("True", "ScalingUp")}
    assert conds["Degraded"]["status"] == "False"


def test_a_deleted_child_is_recreated(kube, operator):
    kube.create_isvc(cpu_service("deleted"))
    reconciled(kube, "deleted")
    old_dep = wait_for(lambda: kube.deployment("deleted"), what="Deployment")
    wait_for(lambda: kube.exists(kube.core.read_namespaced_service, "deleted"), what="Service")
    kube.apps.delete_namespaced_deployment("deleted", NS)
    kube.core.delete_namespaced_service("deleted", NS)
    wait_for(lambda: kube.deployment("deleted")["metadata"]["uid"] != old_dep["metadata"]["uid"],
             what="a new Deployment")
    wait_for(lambda: kube.exists(kube.core.read_namespaced_service, "deleted"), what="a new Service")


def test_a_hand_edit_is_repaired_but_another_managers_field_is_left_alone(kube, operator):
    kube.create_isvc(cpu_service("edited"))
    reconciled(kube, "edited")
    wait_for(lambda: kube.deployment("edited"), what="Deployment")
    # Someone edits a field the operator owns, and adds one the operator does not render.
    kube.apps.patch_namespaced_deployment("edited", NS, {
        "metadata": {"annotations": {"team.example/owner": "search"}},
        "spec": {"template": {"spec": {"containers": [{"name": "engine", "image": "evil:latest"}]}}}},
        field_manager="kubectl-edit")
    dep = wait_for(lambda: (d := kube.deployment("edited")) and container(d)["image"] == IMAGE and d,
                   what="the image repaired")
    assert dep["metadata"]["annotations"]["team.example/owner"] == "search"
    managers = {m["manager"]: m for m in dep["metadata"]["managedFields"]}
    assert "flotilla" in managers and managers["flotilla"]["operation"] == "Apply"
    assert "kubectl-edit" in managers  # still owns its annotation


def test_the_scale_subresource_reaches_the_deployment_and_the_pdb_follows(kube, operator):
    kube.create_isvc(cpu_service("scaled", replicas=2))
    reconciled(kube, "scaled")
    wait_for(lambda: kube.exists(kube.policy.read_namespaced_pod_disruption_budget, "scaled"), what="PDB")
    # What `kubectl scale` and the builtin autoscaler (KubeCluster.scale) both do.
    kube.custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "scaled", {"spec": {"replicas": 3}})
    wait_for(lambda: kube.deployment("scaled")["spec"]["replicas"] == 3, what="Deployment replicas 3")
    scale = kube.custom.get_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "scaled")
    assert scale["spec"]["replicas"] == 3
    wait_for(lambda: kube.custom.get_namespaced_custom_object_scale(
        GROUP, VERSION, NS, PLURAL, "scaled")["status"].get("selector"), what="scale status selector")
    # A few reconciles later (timer every 3 s) nobody has put it back.
    time.sleep(4)
    assert kube.deployment("scaled")["spec"]["replicas"] == 3
    assert kube.isvc("scaled")["spec"]["replicas"] == 3
    # One replica needs no PDB: it is deleted.
    kube.custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "scaled", {"spec": {"replicas": 1}})
    wait_for(lambda: not kube.exists(kube.policy.read_namespaced_pod_disruption_budget, "scaled"),
             what="PDB deleted at 1 replica")
    assert kube.deployment("scaled")["spec"]["replicas"] == 1


def test_the_namespace_router_is_rendered_and_its_own_account_can_route_and_wake(kube, operator, control_plane):  # noqa: F811
    """The operator runs the router beside the services (FLOTILLA_ROUTER=namespace, the default): its Deployment,
    Service, account, Role and RoleBinding, owned by the service, and status names it. Then the router's discovery
    runs as that very service account (a token from the TokenRequest API, RBAC on): it may list the services and
    their EndpointSlices and wake one scaled to zero, which proves the Role grants enough."""
    import kubernetes

    from flotilla.operator.router_objects import ROUTER_NAME
    from flotilla.router.kubernetes import KubernetesBackends

    body = cpu_service("routed", replicas=0)
    body["spec"]["model"]["servedModelName"] = "routed-model"
    isvc = kube.create_isvc(body)
    wait_for(lambda: kube.isvc("routed").get("status", {}).get("routerURL") ==
             f"http://{ROUTER_NAME}.{NS}.svc:8000/v1", what="status.routerURL")
    dep = wait_for(lambda: kube.deployment(ROUTER_NAME), what="the router Deployment")
    assert any(r["uid"] == isvc["metadata"]["uid"] for r in dep["metadata"]["ownerReferences"])
    assert container(dep)["args"][:3] == ["--kubernetes", "--namespace", NS]
    assert kube.core.read_namespaced_service(ROUTER_NAME, NS).spec.ports[0].port == 8000
    token = kube.core.create_namespaced_service_account_token(
        ROUTER_NAME, NS, {"spec": {"expirationSeconds": 600}}).status.token
    config = kubernetes.client.Configuration()
    config.host = control_plane.server
    config.ssl_ca_cert = str(control_plane.workdir / "ca.crt")
    config.api_key = {"authorization": f"Bearer {token}"}
    backends = KubernetesBackends(NS, api_client=kubernetes.client.ApiClient(config))
    backends.refresh()  # lists InferenceServices and EndpointSlices as the router's account
    assert backends.replicas("routed-model") == ()  # known, no ready replica

    async def wake() -> None:
        await backends.start()
        try:
            await backends.wake("routed-model")
        finally:
            await backends.stop()

    asyncio.run(wake())
    assert kube.isvc("routed")["spec"]["replicas"] == 1  # through the scale subresource, as the router's account
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "routed")


def test_deleting_the_service_garbage_collects_every_child(kube, operator):
    kube.create_isvc(cpu_service("doomed", replicas=2))
    reconciled(kube, "doomed")
    wait_for(lambda: kube.exists(kube.policy.read_namespaced_pod_disruption_budget, "doomed"), what="PDB")
    wait_for(lambda: kube.deployment("doomed")["status"].get("replicas") == 2, what="pods")
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "doomed")

    def gone() -> bool:
        pods = kube.core.list_namespaced_pod(NS, label_selector="app.kubernetes.io/instance=doomed").items
        return not (kube.exists(kube.apps.read_namespaced_deployment, "doomed")
                    or kube.exists(kube.core.read_namespaced_service, "doomed")
                    or kube.exists(kube.policy.read_namespaced_pod_disruption_budget, "doomed")
                    or pods)
    wait_for(gone, timeout=60, what="every child garbage-collected")


def test_one_loader_job_fills_a_shared_cache_for_two_services_and_outlives_the_first(kube, operator):
    """Two services, one model, one claim: one Job owned by both; no engine Deployment until it succeeded; the
    credentials reach it only through secretKeyRef; deleting one service leaves the Job to the other. (No job
    controller runs here: the test writes the Job's status as the controller would; tests/test_node.py runs it.)"""
    def cached(name: str) -> dict[str, Any]:
        body = cpu_service(name, replicas=1)
        body["spec"]["model"]["credentialsSecretRef"] = {"name": "hf-credentials"}
        body["spec"]["modelCache"] = {"claimName": "shared-models"}
        return body

    for name in ("cache-a", "cache-b"):
        kube.create_isvc(cached(name))

    def shared_job() -> dict[str, Any] | None:
        jobs = kube.plain(kube.batch.list_namespaced_job(NS, label_selector="flotilla.dev/model-loader")).get("items")
        owners = [r["name"] for j in jobs for r in j["metadata"].get("ownerReferences") or ()]
        return jobs[0] if len(jobs) == 1 and sorted(owners) == ["cache-a", "cache-b"] else None
    job = wait_for(shared_job, what="one loader Job owned by both services")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-credentials"
    assert all("value" not in env[k] for k in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY"))

    def condition_of(name: str, ctype: str) -> tuple[str, str] | None:
        c = next((c for c in (kube.isvc(name).get("status") or {}).get("conditions") or () if c["type"] == ctype),
                 None)
        return (c["status"], c["reason"]) if c else None
    for name in ("cache-a", "cache-b"):
        wait_for(lambda: condition_of(name, "ModelCached") == ("False", "Pending"), what=f"{name} ModelCached Pending")
        assert condition_of(name, "Progressing") == ("True", "WaitingForModelCache")
        assert not kube.exists(kube.apps.read_namespaced_deployment, name)

    # what the job controller writes when the loader's pod succeeded
    name = job["metadata"]["name"]
    kube.batch.patch_namespaced_job_status(name, NS, {"status": {
        "startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:01:30Z", "succeeded": 1,
        "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": "2026-01-01T00:01:30Z"},
            {"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:01:30Z"}]}})
    for svc in ("cache-a", "cache-b"):
        wait_for(lambda: condition_of(svc, "ModelCached") == ("True", "Ready"), what=f"{svc} ModelCached Ready")
        wait_for(lambda: kube.exists(kube.apps.read_namespaced_deployment, svc), what=f"{svc} Deployment")
        assert kube.isvc(svc)["status"]["modelCache"] == {"job": name, "phase": "Ready", "seconds": 90}
        pod_env = {e["name"]: e.get("value") for e in container(kube.deployment(svc))["env"]}
        assert pod_env["HF_HUB_OFFLINE"] == "1"

    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "cache-a")
    # (the garbage collector learns of new resource types on its discovery resync: allow it a few)
    wait_for(lambda: not kube.exists(kube.apps.read_namespaced_deployment, "cache-a"), timeout=120,
             what="cache-a collected")
    # the garbage collector drops the gone owner's reference, and keeps the Job for the other
    wait_for(lambda: [r.name for r in kube.batch.read_namespaced_job(name, NS).metadata.owner_references]
             == ["cache-b"], timeout=120, what="the Job owned by cache-b alone")
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "cache-b")
    wait_for(lambda: not kube.exists(kube.batch.read_namespaced_job, name), timeout=120,
             what="the Job goes with its last owner")


def test_an_operator_restart_loses_nothing(kube, operator):
    kube.create_isvc(cpu_service("restart"))
    kube.create_isvc(cpu_service("restart-quiet"))
    reconciled(kube, "restart")
    reconciled(kube, "restart-quiet")
    wait_for(lambda: kube.exists(kube.core.read_namespaced_service, "restart-quiet"), what="Service")
    operator.stop()
    try:
        # While it is down: a spec change, deleted children (one of a service whose spec did not change,
        # so only resuming can notice), and a brand-new service.
        kube.patch_isvc("restart", {"spec": {"engine": {"maxNumSeqs": 5}}})
        kube.core.delete_namespaced_service("restart", NS)
        kube.core.delete_namespaced_service("restart-quiet", NS)
        kube.create_isvc(cpu_service("born-while-down"))
        time.sleep(1)
        assert not kube.exists(kube.core.read_namespaced_service, "restart")
    finally:
        operator.start()
    reconciled(kube, "restart")
    wait_for(lambda: flag(kube.deployment("restart"), "--max-num-seqs") == "5", what="spec change applied")
    wait_for(lambda: kube.exists(kube.core.read_namespaced_service, "restart"), what="Service recreated")
    wait_for(lambda: kube.exists(kube.core.read_namespaced_service, "restart-quiet"), what="quiet Service recreated")
    reconciled(kube, "born-while-down")
    wait_for(lambda: kube.deployment("born-while-down"), what="Deployment of the new service")


def _acted(op: Operator, since: int = 0) -> bool:
    """Whether this operator process ran a spec handler after `since` (an offset into its own log)."""
    return "Handler 'on_spec' succeeded" in op.log()[since:]


def test_two_replicas_with_peering_only_one_acts(control_plane, kube, operator):  # noqa: F811
    operator.stop()  # the standalone one would act regardless of peering
    # No KopfPeering object exists: the first replica creates it (with no object, kopf would wait forever).
    # POD_ID is kopf's peer identity (the pod name, in a cluster). A replica with --peering starts paused and
    # resumes only once it has read the peering object and found no live peer above it; so the higher one is
    # started first and shown active, and the lower one, starting after, can never act while it lives.
    high = Operator(control_plane, "--peering", "flotilla", "--priority", "200", env={"POD_ID": "replica-high"})
    low = Operator(control_plane, "--peering", "flotilla", "--priority", "100", env={"POD_ID": "replica-low"})
    replicas = [high.start()]
    try:
        wait_for(lambda: "Resuming operations after the pause" in high.log(), what="the higher replica to resume")
        replicas.append(low.start())

        def peers() -> dict[str, Any]:
            obj = kube.custom.get_namespaced_custom_object("kopf.dev", "v1", NS, "kopfpeerings", "flotilla")
            return obj.get("status") or {}

        wait_for(lambda: set(peers()) >= {"replica-high", "replica-low"}, what="both replicas in the peering object")
        since = [len(op.log()) for op in (high, low)]
        kube.create_isvc(cpu_service("peered"))
        reconciled(kube, "peered")
        wait_for(lambda: _acted(high, since[0]), what="the active replica's handler to finish")
        assert not _acted(low, since[1]) and "Resuming operations" not in low.log(), low.log()[-2000:]
        # The active one stops (and leaves the peering object): the standby resumes and takes over.
        since_low = len(low.log())
        high.stop()
        wait_for(lambda: "Resuming operations after the pause" in low.log()[since_low:], what="the standby to resume")
        kube.create_isvc(cpu_service("after-failover"))
        reconciled(kube, "after-failover")
        wait_for(lambda: _acted(low, since_low), what="the standby's handler to finish")
    finally:
        for op in replicas:
            op.stop()
        operator.start()


def test_no_operator_handler_failed_with_an_exception():
    """Every operator process this module ran: a handler that crashed is a bug even where a retry hid it."""
    crashes = [line for op in Operator.started for line in op.log().splitlines()
               if "failed with an exception" in line or "Traceback" in line]
    assert crashes == []
