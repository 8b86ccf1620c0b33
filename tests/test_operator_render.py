"""Rendering: every object rendered from many specs validates against the official Kubernetes schemas
(kubernetes-validate, strict, oldest and newest supported release), and carries the GPU limits,
/dev/shm, probes, drain timing, security context and secret handling the engine needs."""
from __future__ import annotations

import itertools

import pytest

from flotilla.operator.fit import startup_budget_seconds
from flotilla.operator.quantity import quantity_bytes
from flotilla.operator.render import (
    PRESTOP_SLEEP_SECONDS, engine_args, render_children, render_deployment, render_hpa, render_loader_job,
    render_pdb, render_scaled_object, render_service, shm_size_bytes)
from flotilla.operator.spec import DEFAULT_ENGINE_IMAGE, ENGINE_IMAGE_ENV, parse_service
from operator_fixtures.oracle import admit, k8s_errors, model_config

GiB = 2**30


def service(spec: dict | None = None, name: str = "chat", uri: str = "meta-llama/Llama-3.1-8B-Instruct"):
    body = {"apiVersion": "flotilla.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": "team-a", "uid": "0b5b7c2e-1111-2222-3333-444455556666",
                         "generation": 3},
            "spec": {"model": {"uri": uri}, **(spec or {})}}
    stored, errors = admit(body)  # only render what the API server would have admitted
    assert errors == []
    return parse_service(stored)


def container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


# A grid over the fields that change the rendered objects' shape (model sources cycle through it).
URIS = itertools.cycle(["org/model-8B", "pvc://weights/llama/70b", "/models/baked-in"])
GRID = [(*combo, next(URIS)) for combo in itertools.product(
    [{"gpus": 0, "cpu": "2", "memory": "4Gi"}, {"gpus": 1}, {"gpus": 4, "memory": "200Gi", "cpu": 16},
     {"gpus": 2, "gpuResourceName": "amd.com/gpu"}],
    [{}, {"enabled": True, "mode": "builtin"}, {"enabled": True, "mode": "hpa", "targetWaitingRequests": 5},
     {"enabled": True, "mode": "keda", "minReplicas": 2, "maxReplicas": 8}],
    [1, 3],
)]


def grid_spec(resources, autoscaling, replicas, uri) -> tuple[dict, str]:
    tp = resources["gpus"] if resources["gpus"] else 1
    spec = {"resources": resources, "autoscaling": autoscaling, "replicas": replicas,
            "engine": {"tensorParallelSize": tp, "maxModelLen": 4096},
            "apiKeySecretRef": {"name": "keys"}, "modelCache": {"claimName": "hf-cache"},
            "nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "env": [{"name": "LOG_LEVEL", "value": "debug"}], "podAnnotations": {"team": "a"},
            "priorityClassName": "high"}
    return spec, uri


@pytest.mark.parametrize("resources,autoscaling,replicas,uri", GRID)
def test_every_rendered_object_validates_against_the_kubernetes_schema(resources, autoscaling, replicas, uri):
    spec, uri = grid_spec(resources, autoscaling, replicas, uri)
    children = render_children(service(spec, uri=uri), model_config("llama-3.1-8b"))
    kinds = [o["kind"] for o in children.objects]
    assert kinds[:2] == ["Service", "Deployment"]
    for obj in children.objects:
        if obj["apiVersion"].startswith("keda.sh"):
            continue  # a KEDA CRD, not in the Kubernetes schemas; checked by field below
        assert k8s_errors(obj) == [], obj["kind"]
    if uri == "org/model-8B":  # a hub model with a model cache: the loader Job fills it
        assert k8s_errors(render_loader_job(service(spec, uri=uri))) == []
    # Every optional kind is either rendered or listed for deletion, never both.
    rendered = {(o["apiVersion"], o["kind"]) for o in children.objects}
    assert not rendered & set(children.absent)
    assert len(rendered | set(children.absent)) == 5


def test_children_carry_owner_references_and_recommended_labels():
    svc = service({"replicas": 2, "autoscaling": {"enabled": True, "mode": "hpa"}})
    for obj in render_children(svc).objects:
        meta = obj["metadata"]
        assert meta["namespace"] == "team-a" and meta["name"] == "chat"
        assert meta["ownerReferences"] == [{"apiVersion": "flotilla.dev/v1alpha1", "kind": "InferenceService",
                                            "name": "chat", "uid": svc.uid, "controller": True,
                                            "blockOwnerDeletion": True}]
        assert meta["labels"]["app.kubernetes.io/instance"] == "chat"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "flotilla-operator"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "flotilla"


def test_engine_args_are_vllm_flags_from_the_spec():
    svc = service({"engine": {"maxModelLen": 8192, "maxNumSeqs": 64, "maxNumBatchedTokens": 4096,
                              "gpuMemoryUtilization": 0.85, "blockSize": 32, "enablePrefixCaching": False,
                              "kvCacheDtype": "fp8", "quantization": "awq", "dtype": "float16",
                              "tensorParallelSize": 2, "extraArgs": ["--seed", "7"]},
                   "resources": {"gpus": 2}, "model": {"uri": "org/m", "servedModelName": "m",
                                                       "tokenizer": "org/tok"}})
    dep = render_deployment(svc)
    c = container(dep)
    assert c["command"] == ["flotilla"]
    args = c["args"]
    assert args[:2] == ["serve", "org/m"]
    pairs = dict(zip(args[2::1], args[3::1]))
    assert pairs["--host"] == "0.0.0.0" and pairs["--port"] == "8000"
    assert pairs["--served-model-name"] == "m" and pairs["--tokenizer"] == "org/tok"
    assert pairs["--max-model-len"] == "8192" and pairs["--max-num-seqs"] == "64"
    assert pairs["--max-num-batched-tokens"] == "4096" and pairs["--gpu-memory-utilization"] == "0.85"
    assert pairs["--block-size"] == "32" and pairs["--kv-cache-dtype"] == "fp8"
    assert pairs["--quantization"] == "awq" and pairs["--dtype"] == "float16"
    assert pairs["--tensor-parallel-size"] == "2"
    assert "--no-enable-prefix-caching" in args and "--enable-prefix-caching" not in args
    assert "--enable-chunked-prefill" in args and "--no-enable-chunked-prefill" not in args
    assert args[-2:] == ["--seed", "7"]


def test_defaults_render_prefix_caching_on_and_the_served_name_from_the_uri():
    args = engine_args(service())
    assert "--enable-prefix-caching" in args
    assert args[args.index("--served-model-name") + 1] == "Llama-3.1-8B-Instruct"
    assert "--max-model-len" not in args  # the engine takes the model's own


@pytest.mark.parametrize("gpus,name", [(1, "nvidia.com/gpu"), (8, "nvidia.com/gpu"), (2, "amd.com/gpu")])
def test_gpu_limits_equal_requests(gpus, name):
    dep = render_deployment(service({"resources": {"gpus": gpus, "gpuResourceName": name},
                                     "engine": {"tensorParallelSize": gpus}}))
    res = container(dep)["resources"]
    assert res["limits"][name] == str(gpus) and res["requests"][name] == str(gpus)


def test_cpu_service_has_no_gpu_resources():
    res = container(render_deployment(service({"resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"}})))["resources"]
    assert res["requests"] == {"cpu": "2", "memory": "4Gi"}
    assert set(res["limits"]) == {"memory"}


@pytest.mark.parametrize("tp,expected_gib", [(1, 1), (2, 8), (4, 16), (8, 32)])
def test_dev_shm_is_a_memory_emptydir_sized_from_tensor_parallelism(tp, expected_gib):
    svc = service({"resources": {"gpus": tp}, "engine": {"tensorParallelSize": tp}})
    assert shm_size_bytes(svc) == expected_gib * GiB
    dep = render_deployment(svc)
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{expected_gib}Gi"}
    mounts = {m["mountPath"]: m["name"] for m in container(dep)["volumeMounts"]}
    assert mounts["/dev/shm"] == "dshm"


def test_shm_size_from_the_spec_wins_and_is_added_to_the_memory_limit():
    svc = service({"shmSize": "3Gi", "resources": {"gpus": 4, "memory": "64Gi"},
                   "engine": {"tensorParallelSize": 4}})
    dep = render_deployment(svc)
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "3Gi"
    res = container(dep)["resources"]
    assert res["requests"]["memory"] == "64Gi"
    assert quantity_bytes(res["limits"]["memory"]) == 67 * GiB


def test_startup_probe_budget_follows_the_model_size_and_guards_liveness():
    small = render_deployment(service(uri="HuggingFaceTB/SmolLM2-135M-Instruct"), model_config("smollm2-135m"))
    big = render_deployment(service(uri="meta-llama/Llama-3.1-70B-Instruct"), model_config("llama-3.1-70b"))

    def budget(dep):
        p = container(dep)["startupProbe"]
        return p["periodSeconds"] * p["failureThreshold"]

    assert budget(small) < 600 < 2400 < budget(big)
    svc = service(uri="meta-llama/Llama-3.1-70B-Instruct")
    assert budget(big) >= startup_budget_seconds(svc, model_config("llama-3.1-70b"))
    # A download from S3 is budgeted like one from the hub, a baked-in or volume path as a faster disk read.
    s3 = startup_budget_seconds(service(uri="s3://b/llama-70b"), model_config("llama-3.1-70b"))
    baked = startup_budget_seconds(service(uri="/models/llama-70b"), model_config("llama-3.1-70b"))
    assert s3 == startup_budget_seconds(svc, model_config("llama-3.1-70b")) > baked
    # The rollout deadline must outlast the load, or a healthy rollout is reported failed.
    assert big["spec"]["progressDeadlineSeconds"] > budget(big)
    c = container(big)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    # Readiness reacts within seconds (draining engines answer 503); liveness is slower to kill.
    ready, live = c["readinessProbe"], c["livenessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 10
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


def test_drain_leaves_the_service_first_then_finishes_requests():
    dep = render_deployment(service({"drainSeconds": 300}))
    c = container(dep)
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_SLEEP_SECONDS)]
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= PRESTOP_SLEEP_SECONDS + 300
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_security_context_is_restricted():
    dep = render_deployment(service())
    pod = dep["spec"]["template"]["spec"]
    sc = container(dep)["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert "privileged" not in sc


def test_api_key_comes_from_the_secret_and_never_appears_in_args():
    dep = render_deployment(service({"apiKeySecretRef": {"name": "keys", "key": "token"}}))
    c = container(dep)
    env = {e["name"]: e for e in c["env"]}
    assert env["FLOTILLA_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "keys", "key": "token"}}
    assert "value" not in env["FLOTILLA_API_KEY"]
    assert not any("key" in a.lower() for a in c["args"])
    assert "FLOTILLA_API_KEY" not in render_deployment(service())["spec"]["template"]["spec"]["containers"][0][
        "env"].__repr__()


def test_revision_is_a_flag_and_credentials_come_only_from_the_secret():
    svc = service({"model": {"uri": "hf://org/model-8B", "revision": "v1.0",
                             "credentialsSecretRef": {"name": "hub-and-s3"}}})
    args = engine_args(svc)
    assert args[1] == "hf://org/model-8B" and args[args.index("--revision") + 1] == "v1.0"
    assert svc.served_model_name == "model-8B"
    env = {e["name"]: e for e in container(render_deployment(svc))["env"]}
    for key in ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "hub-and-s3", "key": key,
                                                                        "optional": True}}}
    assert not any("hub-and-s3" in a for a in args)


def test_an_s3_model_is_passed_to_the_engine_as_its_uri():
    svc = service(uri="s3://bucket/models/llama-8b")
    assert svc.model.source == "s3" and engine_args(svc)[1] == "s3://bucket/models/llama-8b"
    assert svc.served_model_name == "llama-8b" and "--revision" not in engine_args(svc)


def test_engine_pods_read_the_shared_model_cache_read_only_and_offline():
    dep = render_deployment(service({"modelCache": {"claimName": "hf-cache"}}))
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "hf-cache", "readOnly": True}
    assert volumes["cache"] == {"name": "cache", "emptyDir": {}}  # Triton and the like still write somewhere
    env = {e["name"]: e.get("value") for e in container(dep)["env"]}
    mounts = {m["name"]: m for m in container(dep)["volumeMounts"]}
    assert mounts["model-cache"]["readOnly"] is True
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_HUB_CACHE"].startswith(mounts["model-cache"]["mountPath"] + "/")
    assert env["FLOTILLA_CACHE"].startswith(mounts["model-cache"]["mountPath"] + "/")
    # without one, the engine downloads into its own writable cache volume
    plain = render_deployment(service())
    env = {e["name"]: e.get("value") for e in container(plain)["env"]}
    assert "HF_HUB_OFFLINE" not in env and "HF_HUB_CACHE" not in env
    mounts = {m["name"]: m["mountPath"] for m in container(plain)["volumeMounts"]}
    assert env["HF_HOME"].startswith(mounts["cache"]) and env["FLOTILLA_CACHE"].startswith(mounts["cache"])


def test_the_loader_job_downloads_into_the_claim_with_the_engine_image_and_credentials_from_the_secret():
    svc = parse_service({"metadata": {"name": "chat", "namespace": "team-a", "uid": "u"}, "spec": {
        "model": {"uri": "meta-llama/Llama-3.1-8B-Instruct", "revision": "v2",
                  "credentialsSecretRef": {"name": "hf"}},
        "modelCache": {"claimName": "hf-cache"}, "image": "registry.local/engine:1",
        "env": [{"name": "HF_ENDPOINT", "value": "http://mirror:8080"}]}})
    job = render_loader_job(svc)
    assert k8s_errors(job) == []
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "registry.local/engine:1" and pod["restartPolicy"] == "Never"
    assert c["command"] == ["flotilla"]
    assert c["args"] == ["download", "meta-llama/Llama-3.1-8B-Instruct", "--revision", "v2",
                         "--report", "/dev/termination-log"]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = {e["name"]: e for e in c["env"]}
    assert "HF_HUB_OFFLINE" not in env and env["HF_ENDPOINT"]["value"] == "http://mirror:8080"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN", "optional": True}
    assert "hf_" not in str(c["args"])  # credentials never in args
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"] == {"claimName": "hf-cache"}  # written: not read-only
    mount = next(m for m in c["volumeMounts"] if m["name"] == claim["name"])
    engine_env = {e["name"]: e.get("value") for e in container(render_deployment(svc))["env"]}
    # the loader writes where the engine pods read
    assert env["HF_HUB_CACHE"]["value"] == engine_env["HF_HUB_CACHE"]
    assert env["HF_HUB_CACHE"]["value"].startswith(mount["mountPath"])
    ref = job["metadata"]["ownerReferences"]
    assert ref == [{"apiVersion": "flotilla.dev/v1alpha1", "kind": "InferenceService", "name": "chat", "uid": "u",
                    "controller": False, "blockOwnerDeletion": False}]


def test_pvc_model_is_mounted_read_only_and_passed_as_a_path():
    dep = render_deployment(service(uri="pvc://llama-weights/Llama-3.1-70B-Instruct"))
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "llama-weights", "readOnly": True}
    mount = next(m for m in container(dep)["volumeMounts"] if m["name"] == "model")
    assert mount["readOnly"] is True
    assert container(dep)["args"][1] == f"{mount['mountPath']}/Llama-3.1-70B-Instruct"


def test_prometheus_scrape_annotations_and_user_annotations():
    dep = render_deployment(service({"podAnnotations": {"sidecar.istio.io/inject": "false"}}))
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"
    assert ann["prometheus.io/path"] == "/metrics" and ann["sidecar.istio.io/inject"] == "false"


def test_image_defaults_from_the_operator_environment(monkeypatch):
    assert container(render_deployment(service()))["image"] == DEFAULT_ENGINE_IMAGE
    monkeypatch.setenv(ENGINE_IMAGE_ENV, "registry.local/flotilla-engine@sha256:abc")
    assert container(render_deployment(service()))["image"] == "registry.local/flotilla-engine@sha256:abc"
    assert container(render_deployment(service({"image": "mine:1"})))["image"] == "mine:1"


def test_service_is_cluster_ip_on_port_8000_named_http():
    svc = service()
    s = render_service(svc)
    assert s["spec"]["type"] == "ClusterIP"
    assert s["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert s["spec"]["selector"] == render_deployment(svc)["spec"]["selector"]["matchLabels"]
    assert svc.endpoint == "http://chat.team-a.svc:8000/v1"


def test_pdb_only_with_more_than_one_replica():
    assert render_pdb(service({"replicas": 1})) is None
    pdb = render_pdb(service({"replicas": 3}))
    assert pdb["spec"]["maxUnavailable"] == 1
    # Autoscaling bounds apply: a replicas field below minReplicas renders minReplicas.
    assert render_pdb(service({"replicas": 1, "autoscaling": {"enabled": True, "minReplicas": 2}})) is not None


def test_replicas_are_clamped_to_autoscaling_bounds():
    dep = render_deployment(service({"replicas": 9, "autoscaling": {"enabled": True, "maxReplicas": 5}}))
    assert dep["spec"]["replicas"] == 5


def test_hpa_scales_the_inference_service_on_pods_metrics():
    hpa = render_hpa(service({"autoscaling": {"enabled": True, "mode": "hpa", "minReplicas": 2, "maxReplicas": 7,
                                              "targetKVCacheUtilization": 0.75, "targetWaitingRequests": 3,
                                              "scaleDownStabilizationSeconds": 600}}))
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "flotilla.dev/v1alpha1", "kind": "InferenceService",
                                      "name": "chat"}
    assert spec["minReplicas"] == 2 and spec["maxReplicas"] == 7
    metrics = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in spec["metrics"]}
    assert metrics["vllm_kv_cache_usage_perc"] == {"type": "AverageValue", "averageValue": "750m"}
    assert metrics["vllm_num_requests_waiting"] == {"type": "AverageValue", "averageValue": "3000m"}
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
    assert render_hpa(service({"autoscaling": {"enabled": True, "mode": "builtin"}})) is None
    assert render_hpa(service({"autoscaling": {"enabled": False, "mode": "hpa"}})) is None


def test_keda_scaled_object_sums_the_fleet_for_average_value():
    so = render_scaled_object(service({"autoscaling": {"enabled": True, "mode": "keda", "maxReplicas": 9,
                                                       "targetWaitingRequests": 2}}), "http://prom:9090")
    spec = so["spec"]
    assert so["apiVersion"] == "keda.sh/v1alpha1" and spec["maxReplicaCount"] == 9
    assert spec["scaleTargetRef"]["kind"] == "InferenceService"
    kv, waiting = spec["triggers"]
    assert kv["type"] == "prometheus" and kv["metadata"]["serverAddress"] == "http://prom:9090"
    assert kv["metadata"]["query"] == 'sum(vllm:kv_cache_usage_perc{namespace="team-a",service="chat"})'
    assert kv["metadata"]["threshold"] == "0.8" and waiting["metadata"]["threshold"] == "2"
    # The HPA that KEDA creates must still be a valid autoscaling/v2 behaviour block.
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa_like = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
                "spec": {"scaleTargetRef": spec["scaleTargetRef"], "maxReplicas": 9, "behavior": behavior}}
    assert k8s_errors(hpa_like) == []


def test_turning_autoscaling_off_lists_its_objects_for_deletion():
    on = render_children(service({"replicas": 2, "autoscaling": {"enabled": True, "mode": "hpa"}}))
    off = render_children(service({"replicas": 1}))
    assert ("autoscaling/v2", "HorizontalPodAutoscaler") not in on.absent
    assert ("autoscaling/v2", "HorizontalPodAutoscaler") in off.absent
    assert ("policy/v1", "PodDisruptionBudget") in off.absent
    assert ("keda.sh/v1alpha1", "ScaledObject") in on.absent


def test_render_is_pure_and_deterministic():
    svc = service({"replicas": 2, "autoscaling": {"enabled": True, "mode": "keda"}})
    assert render_children(svc, model_config("llama-3.1-8b")) == render_children(svc, model_config("llama-3.1-8b"))
