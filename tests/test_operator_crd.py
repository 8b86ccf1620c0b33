"""The InferenceService CRD: a valid apiextensions/v1 object whose own schema admits every sample,
rejects bad specs (OpenAPI and CEL rules, evaluated here with cel-python), and whose defaults agree
with the operator's dataclass defaults."""
from __future__ import annotations

import copy
import re

import pytest

from flotilla.operator.spec import AutoscalingSpec, EngineSpec, LoRASpec, ResourceSpec, parse_service
from operator_fixtures.oracle import ROOT, admit, crd, crd_schema, k8s_errors, load_yaml_docs

SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))


def sample_services() -> list[tuple[str, dict]]:
    out = []
    for path in SAMPLES:
        for doc in load_yaml_docs(path):
            if doc.get("kind") == "InferenceService":
                out.append((path.name, doc))
    return out


def minimal(**spec) -> dict:
    body = {"apiVersion": "flotilla.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "m", "namespace": "ns"}, "spec": {"model": {"uri": "org/model"}}}
    for key, value in spec.items():
        body["spec"][key] = value
    return body


def test_crd_is_a_valid_apiextensions_v1_object():
    assert k8s_errors(crd()) == []


def test_crd_has_status_and_scale_subresources_for_hpa_and_kubectl_scale():
    version = crd()["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    assert version["subresources"]["status"] == {}
    assert scale == {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                     "labelSelectorPath": ".status.selector"}
    schema = crd_schema()
    for path in scale.values():
        node = schema
        for part in path.strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] in ("integer", "string")


def test_printer_columns_point_at_fields_the_schema_has():
    schema = crd_schema()
    columns = crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    assert {c["name"] for c in columns} >= {"Model", "Desired", "Available", "KV-Cache", "Ready", "Age"}
    for column in columns:
        path = re.sub(r"\[\?.*?\]", "", column["jsonPath"]).strip(".").split(".")
        if path[0] == "metadata":
            continue
        node = schema
        for part in path:
            node = node.get("items", node)["properties"][part]
        assert node, column


def test_crd_has_a_short_name():
    assert "isvc" in crd()["spec"]["names"]["shortNames"]


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural_every_node_has_a_type():
    for path, node in _walk(crd_schema()):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path


def test_cel_rules_compile_and_reference_only_declared_fields():
    # An undeclared field in a rule is a compile error on the API server; catch typos here.
    for path, node in _walk(crd_schema()):
        for rule in node.get("x-kubernetes-validations") or ():
            for dotted in re.findall(r"self((?:\.[a-zA-Z]+)+)", rule["rule"]):
                cursor = node
                for part in dotted.strip(".").split("."):
                    if part in ("startsWith", "endsWith", "contains", "matches"):  # CEL string methods
                        break
                    assert part in cursor.get("properties", {}), (path, rule["rule"], part)
                    cursor = cursor["properties"][part]


@pytest.mark.parametrize("name,body", sample_services(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_sample_is_admitted(name, body):
    defaulted, errors = admit(body)
    assert errors == []
    parse_service(defaulted)  # and the operator accepts what the API server stores


def test_defaults_are_applied_like_the_api_server_does():
    stored, errors = admit(minimal())
    assert errors == []
    spec = stored["spec"]
    assert spec["replicas"] == 1
    assert spec["engine"]["blockSize"] == 16 and spec["engine"]["gpuMemoryUtilization"] == 0.9
    assert spec["resources"] == {"gpus": 1, "gpuResourceName": "nvidia.com/gpu"}
    assert spec["autoscaling"]["targetKVCacheUtilization"] == 0.8
    assert spec["autoscaling"]["mode"] == "builtin"


def _defaults(schema: dict) -> dict:
    return {k: v["default"] for k, v in schema["properties"].items() if "default" in v}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


@pytest.mark.parametrize("section,dataclass", [("engine", EngineSpec), ("resources", ResourceSpec),
                                               ("autoscaling", AutoscalingSpec), ("lora", LoRASpec)])
def test_crd_defaults_equal_the_operator_defaults(section, dataclass):
    crd_defaults = _defaults(crd_schema()["properties"]["spec"]["properties"][section])
    instance = dataclass()
    fields = {_camel(f).replace("KvCache", "KVCache"): getattr(instance, f)
              for f in dataclass.__dataclass_fields__}
    assert crd_defaults, section
    for key, value in crd_defaults.items():
        assert fields[key] == value, (section, key)


INVALID = [
    ("no model", lambda b: b["spec"].pop("model"), "model"),
    ("min above max", lambda b: b["spec"].update(autoscaling={"minReplicas": 5, "maxReplicas": 2}),
     "minReplicas must be <= "),
    ("gpu util over 0.95", lambda b: b["spec"].update(engine={"gpuMemoryUtilization": 0.97}),
     "gpuMemoryUtilization"),
    ("gpu util zero", lambda b: b["spec"].update(engine={"gpuMemoryUtilization": 0}), "gpuMemoryUtilization"),
    ("gpu util one (an int)", lambda b: b["spec"].update(engine={"gpuMemoryUtilization": 1}),
     "gpuMemoryUtilization"),
    ("target kv 1", lambda b: b["spec"].update(autoscaling={"targetKVCacheUtilization": 1.0}),
     "targetKVCacheUtilization"),
    ("target kv 0", lambda b: b["spec"].update(autoscaling={"targetKVCacheUtilization": 0}),
     "targetKVCacheUtilization"),
    ("tp above gpus", lambda b: b["spec"].update(engine={"tensorParallelSize": 4}, resources={"gpus": 2}),
     "tensorParallelSize"),
    ("tp without gpus", lambda b: b["spec"].update(engine={"tensorParallelSize": 2}, resources={"gpus": 0}),
     "tensorParallelSize"),
    ("bad block size", lambda b: b["spec"].update(engine={"blockSize": 12}), "blockSize"),
    ("bad mode", lambda b: b["spec"].update(autoscaling={"mode": "magic"}), "mode"),
    ("negative replicas", lambda b: b["spec"].update(replicas=-1), "replicas"),
    ("bad pvc uri", lambda b: b["spec"]["model"].update(uri="pvc://Claim_1"), "pvc://<claim>/<path>"),
    ("config and configMapRef", lambda b: b["spec"]["model"].update(config={}, configMapRef={"name": "c"}),
     "not both"),
    ("batched tokens below max len without chunking", lambda b: b["spec"].update(
        engine={"enableChunkedPrefill": False, "maxModelLen": 8192, "maxNumBatchedTokens": 2048}),
     "maxNumBatchedTokens"),
    ("zero waiting target", lambda b: b["spec"].update(autoscaling={"targetWaitingRequests": 0}),
     "targetWaitingRequests"),
    ("revision of an s3 model", lambda b: b["spec"]["model"].update(uri="s3://bucket/llama", revision="main"),
     "revision applies to a Hugging Face repo"),
    ("revision twice", lambda b: b["spec"]["model"].update(uri="org/model@v1", revision="v2"),
     "revision applies to a Hugging Face repo"),
    ("credentials without a name", lambda b: b["spec"]["model"].update(credentialsSecretRef={}), "name"),
    ("scale to zero under the hpa", lambda b: b["spec"].update(autoscaling={"mode": "hpa", "minReplicas": 0}),
     "minReplicas 0 (scale to zero) needs mode builtin"),
    ("a too short idle time", lambda b: b["spec"].update(autoscaling={"minReplicas": 0, "scaleToZeroAfterSeconds": 5}),
     "scaleToZeroAfterSeconds"),
    ("an adapter on a pvc", lambda b: b["spec"].update(adapters=[{"name": "a", "uri": "pvc://claim/a"}]),
     "pvc:// is not mounted for adapters"),
    ("an adapter without a uri", lambda b: b["spec"].update(adapters=[{"name": "a"}]), "uri"),
    ("an adapter name with a space", lambda b: b["spec"].update(adapters=[{"name": "a b", "uri": "org/a"}]), "name"),
    ("cpu loras below loras", lambda b: b["spec"].update(lora={"maxLoras": 8, "maxCpuLoras": 4}),
     "lora.maxCpuLoras must be >= lora.maxLoras"),
    ("a lora rank vllm does not take", lambda b: b["spec"].update(lora={"maxLoraRank": 24}), "maxLoraRank"),
    ("adapters behind an api key", lambda b: b["spec"].update(adapters=[{"name": "a", "uri": "org/a"}],
                                                             apiKeySecretRef={"name": "keys"}), "never reads Secrets"),
]


@pytest.mark.parametrize("label,mutate,expected", INVALID, ids=[i[0] for i in INVALID])
def test_invalid_specs_are_rejected_with_a_useful_message(label, mutate, expected):
    body = minimal()
    mutate(body)
    _, errors = admit(body)
    assert errors, label
    assert any(expected in e for e in errors), errors


VALID_EDGES = [
    ("tp equal gpus", {"engine": {"tensorParallelSize": 8}, "resources": {"gpus": 8}}),
    ("cpu only", {"resources": {"gpus": 0}}),
    ("util exactly 0.95", {"engine": {"gpuMemoryUtilization": 0.95}}),
    ("min equals max", {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 3}}),
    ("scale to zero", {"autoscaling": {"enabled": True, "minReplicas": 0, "scaleToZeroAfterSeconds": 30}}),
    ("chunked prefill lifts the batched-token rule",
     {"engine": {"maxModelLen": 8192, "maxNumBatchedTokens": 2048}}),
    ("quantities as ints and strings", {"shmSize": 2147483648, "resources": {"memory": "16Gi", "cpu": 4}}),
    ("hub repo at a revision with credentials",
     {"model": {"uri": "hf://org/model", "revision": "v1.0", "credentialsSecretRef": {"name": "hf"}}}),
    ("s3 model", {"model": {"uri": "s3://bucket/models/llama-8b", "credentialsSecretRef": {"name": "aws"}}}),
    ("adapters with lora's defaults", {"adapters": [{"name": "sql-lora", "uri": "org/sql-lora"},
                                                    {"name": "org/chat:v2", "uri": "s3://bucket/chat"}]}),
    ("lora on, no adapters yet", {"lora": {"maxLoras": 1, "maxLoraRank": 64, "maxCpuLoras": 1}}),
]


@pytest.mark.parametrize("label,spec", VALID_EDGES, ids=[v[0] for v in VALID_EDGES])
def test_edge_values_are_admitted(label, spec):
    body = minimal(**copy.deepcopy(spec))
    stored, errors = admit(body)
    assert errors == [], label
    parse_service(stored)


OPERATOR_CHECKED = {"min above max", "gpu util over 0.95", "gpu util zero", "gpu util one (an int)",
                    "target kv 1", "target kv 0", "tp above gpus", "tp without gpus", "bad mode",
                    "negative replicas", "bad pvc uri", "no model", "zero waiting target",
                    "revision of an s3 model", "revision twice", "scale to zero under the hpa",
                    "a too short idle time", "an adapter on a pvc", "an adapter without a uri",
                    "an adapter name with a space", "cpu loras below loras", "a lora rank vllm does not take",
                    "adapters behind an api key"}


@pytest.mark.parametrize("label,mutate", [(i[0], i[1]) for i in INVALID if i[0] in OPERATOR_CHECKED],
                         ids=sorted(OPERATOR_CHECKED, key=[i[0] for i in INVALID].index))
def test_operator_rejects_the_same_specs_when_stored_before_the_rules_existed(label, mutate):
    from flotilla.operator.spec import SpecError
    body = minimal()
    mutate(body)
    with pytest.raises(SpecError):
        parse_service(body)
