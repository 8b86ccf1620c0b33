"""Install manifests: every object is valid for Kubernetes, the kustomizations only name files that
exist, RBAC grants exactly what the operator calls, and the monitoring bundle speaks the engine's
metric names. Also: the operator process never imports torch or the engine."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flotilla.operator.cluster import RBAC_RULES
from operator_fixtures.oracle import ROOT, k8s_errors, load_yaml_docs

MANIFESTS = ROOT / "manifests"
NOT_IN_K8S_SCHEMAS = {"ServiceMonitor", "PrometheusRule", "InferenceService", "Kustomization", "ClusterKopfPeering"}


def kustomize(directory: Path) -> list[dict]:
    """The objects a kustomization's `resources` pull in, recursively (what `kubectl apply -k` applies,
    less generators and transformers)."""
    config = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects = []
    for entry in config.get("resources", ()):
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml names missing {entry}"
        if path.is_dir():
            objects += kustomize(path)
        else:
            objects += load_yaml_docs(path)
    for generator in config.get("configMapGenerator", ()):
        for f in generator.get("files", ()):
            assert (directory / f).exists(), f
    return objects


def all_manifest_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(list(MANIFESTS.rglob("*.yaml")) + list((ROOT / "crds").glob("*.yaml"))):
        for doc in load_yaml_docs(path):
            docs.append((str(path.relative_to(ROOT)), doc))
    return docs


@pytest.mark.parametrize("where,doc", [d for d in all_manifest_docs() if d[1].get("kind") not in NOT_IN_K8S_SCHEMAS],
                         ids=lambda x: x if isinstance(x, str) else x.get("kind", ""))
def test_every_manifest_validates_against_the_kubernetes_schema(where, doc):
    assert k8s_errors(doc) == []


def test_one_kustomization_installs_the_whole_operator():
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in kustomize(MANIFESTS))
    assert ("CustomResourceDefinition", "inferenceservices.flotilla.dev") in kinds
    assert ("CustomResourceDefinition", "kopfpeerings.kopf.dev") in kinds
    # No peering object: a custom object in the same apply as its CRD fails the first `kubectl apply -k`;
    # the operator creates its own at startup (tests/test_controlplane_operator.py, tests/test_node.py).
    assert not any(k.endswith("KopfPeering") for k, _ in kinds)
    for kind in ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"):
        assert any(k == kind for k, _ in kinds), kind
    kustomize(MANIFESTS / "samples")
    kustomize(MANIFESTS / "monitoring")


def _by_kind(kind: str, name: str | None = None) -> dict:
    return next(o for o in kustomize(MANIFESTS) if o["kind"] == kind and (name is None or o["metadata"]["name"] == name))


def test_cluster_role_grants_exactly_what_the_operator_calls():
    role = _by_kind("ClusterRole", "flotilla-operator")
    granted = set()
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted |= {(group, resource, verb) for verb in rule["verbs"]}
    needed = {(g, r, v) for g, r, verbs in RBAC_RULES for v in verbs}
    assert granted == needed
    # Secrets stay out of reach: the engine reads its key through the pod spec, not the operator.
    assert not any(r == "secrets" for _, r, _ in granted)


def test_operator_deployment_runs_the_module_as_non_root_with_probes_on_its_ports():
    from flotilla.operator.__main__ import parse_args

    dep = _by_kind("Deployment", "flotilla-operator")
    binding = _by_kind("ClusterRoleBinding", "flotilla-operator")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["python", "-m", "flotilla.operator"]
    args = parse_args(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["healthz"] == args.liveness_port and ports["metrics"] == args.metrics_port
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["serviceAccountName"] == binding["subjects"][0]["name"]
    assert dep["metadata"]["namespace"] == binding["subjects"][0]["namespace"]
    assert dep["spec"]["replicas"] >= 2 and not args.standalone  # peering: one active, one standby
    env = {e["name"]: e for e in c["env"]}  # kopf names each peer by POD_ID (else user@host/time)
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_dockerfile_is_slim_non_root_and_carries_no_engine_dependencies():
    text = (ROOT / "Dockerfile.operator").read_text()
    # The default base is slim Python; BASE_IMAGE swaps it (a local image where no registry is reachable).
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim$", text, re.M)
    assert set(re.findall(r"^FROM (\S+)", text, re.M)) == {"${BASE_IMAGE}"}
    assert "['optional-dependencies']['operator']" in text and "['engine']" not in text and ".[engine" not in text
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and not any("torch" in line for line in installs)
    assert "'torch' not in sys.modules" in text  # the build itself proves the operator imports no torch
    user = re.findall(r"^USER (\S+)", text, re.M)[-1]
    assert not user.startswith(("root", "0"))
    assert 'ENTRYPOINT ["python", "-m", "flotilla.operator"]' in text


def _alerts() -> dict[str, dict]:
    rule = load_yaml_docs(MANIFESTS / "monitoring" / "prometheusrule.yaml")[0]
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def test_prometheus_rule_has_the_alerts_operators_expect():
    alerts = _alerts()
    assert {"FlotillaTTFTP95OverSLO", "FlotillaKVCacheSaturated", "FlotillaPreemptionsRising",
            "FlotillaPrefixCacheHitRateCollapsed"} <= set(alerts)
    assert "vllm:time_to_first_token_seconds_bucket" in alerts["FlotillaTTFTP95OverSLO"]["expr"]
    kv = alerts["FlotillaKVCacheSaturated"]
    assert "vllm:kv_cache_usage_perc" in kv["expr"] and "0.95" in kv["expr"] and kv["for"] == "10m"
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("info", "warning", "critical")
        assert alert["annotations"]["summary"]
        assert alert["expr"].count("(") == alert["expr"].count(")")


def test_dashboard_and_alerts_only_use_metrics_the_fleet_exports():
    dash = json.loads((MANIFESTS / "monitoring" / "flotilla-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]] + [a["expr"] for a in _alerts().values()]
    names = {n for e in exprs for n in re.findall(r"\b((?:vllm|flotilla)[a-z_]*:[a-z0-9_]+|flotilla_operator_[a-z_]+)", e)}
    assert names, exprs
    engine_names = {n for n in names if n.startswith("vllm:")}
    # The names vLLM uses, which the engine keeps (histograms by _bucket, counters by _total).
    vllm = {"vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
            "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_bucket",
            "vllm:e2e_request_latency_seconds_bucket", "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total", "vllm:num_preemptions_total", "vllm:prefix_cache_hits_total",
            "vllm:prefix_cache_queries_total"}
    assert engine_names <= vllm
    from flotilla.operator import metrics
    from prometheus_client.metrics import MetricWrapperBase
    ours = {m.describe()[0].name for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    assert "flotilla_operator_desired_replicas" in ours
    for n in names - engine_names:
        assert n.removesuffix("_total") in ours, n
    assert {p["gridPos"]["y"] for p in dash["panels"]} and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_operator_modules_never_import_torch_or_the_engine():
    for path in (ROOT / "operator").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("torch", "flotilla.engine", "flotilla.kernels", "triton")), (path, name)
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_python_m_flotilla_operator_starts_without_torch():
    code = ("import sys, runpy; sys.argv = ['flotilla.operator', '--help']\n"
            "import flotilla.operator.handlers\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "runpy.run_module('flotilla.operator', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--all-namespaces" in result.stdout and "--namespace" in result.stdout


def _granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_the_router_is_granted_exactly_what_it_calls_in_both_modes():
    """The cluster-wide router's ClusterRole (manifests/router/) and the Role the operator renders per namespace
    hold the same rules, ROUTER_RBAC_RULES; the operator holds every one of them (RBAC lets no one grant more than
    it has)."""
    from flotilla.operator.router_objects import ROUTER_RBAC_RULES, render_router

    needed = {(g, r, v) for g, r, verbs in ROUTER_RBAC_RULES for v in verbs}
    cluster_role = next(o for o in kustomize(MANIFESTS / "router") if o["kind"] == "ClusterRole")
    assert _granted(cluster_role["rules"]) == needed
    owner = {"metadata": {"name": "chat", "uid": "u"}}
    role = next(o for o in render_router("ns", "img", [owner]) if o["kind"] == "Role")
    assert _granted(role["rules"]) == needed
    assert needed <= _granted(_by_kind("ClusterRole", "flotilla-operator")["rules"])
    for obj in render_router("ns", "img", [owner]):
        assert k8s_errors(obj) == [], obj["kind"]
    deployment = next(o for o in kustomize(MANIFESTS / "router") if o["kind"] == "Deployment")
    from flotilla.router.cli import add_arguments
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.kubernetes and args.namespace is None and args.port == 8000
