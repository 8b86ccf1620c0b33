"""Test oracles for the operator: the CRD's own schema (defaults, OpenAPI validation, CEL rules) and
the official Kubernetes schemas, applied the way the API server applies them."""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "inferenceservice.yaml"
MODELS = Path(__file__).parent / "models"
#: The oldest and newest Kubernetes releases the rendered objects must be valid for.
K8S_VERSIONS = ("1.29.0", "1.37.0")


def model_config(name: str) -> dict[str, Any]:
    return json.loads((MODELS / f"{name}.json").read_text())


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@functools.lru_cache(maxsize=1)
def _crd_cached() -> dict[str, Any]:
    return load_yaml_docs(CRD_PATH)[0]


def crd() -> dict[str, Any]:
    """The CRD as parsed from crds/ (a fresh copy: tests may mutate it)."""
    return copy.deepcopy(_crd_cached())


def crd_schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: a missing property with a default gets it,
    and defaulted objects are defaulted in turn (so `default: {}` pulls in the nested defaults)."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, sub in props.items():
            if key in value:
                value[key] = apply_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in props:
                    value[key] = apply_defaults(extra, value[key])
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], v) for v in value]
    return value


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(crd_schema())


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """OpenAPI v3 (draft-4 style: boolean exclusiveMinimum) validation against the CRD's schema."""
    validator = _validator()
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def _as_cel_input(schema: dict[str, Any], value: Any) -> Any:
    # CEL sees `type: number` fields as doubles even when the YAML says `1`.
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        return {k: _as_cel_input(props.get(k, {}), v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_cel_input(schema.get("items", {}), v) for v in value]
    return value


_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _program(rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule))
    return _PROGRAMS[rule]


def cel_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Evaluate every x-kubernetes-validations rule in the schema against the value at its node."""
    errors = []
    for rule in schema.get("x-kubernetes-validations") or ():
        result = _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(_as_cel_input(schema, value))})
        if result is not True and not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            errors.append(f"{path or '<root>'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                errors += cel_errors(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += cel_errors(schema["items"], v, f"{path}[{i}]")
    return errors


def admit(obj: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """What the API server would store (defaults applied) and why it would refuse it (empty: admitted)."""
    schema = crd_schema()
    defaulted = apply_defaults(schema, obj)
    errors = schema_errors(defaulted)
    if not errors:  # the API server only runs CEL on schema-valid objects
        errors = cel_errors(schema, defaulted)
    return defaulted, errors


def k8s_errors(obj: dict[str, Any]) -> list[str]:
    """Validation against the official Kubernetes schemas (strict: unknown fields are errors)."""
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{version}: {e.message} at {'.'.join(map(str, e.path))}")
    return errors
