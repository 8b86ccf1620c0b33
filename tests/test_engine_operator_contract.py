"""The operator renders `flotilla serve` arguments; the engine's own CLI parser must accept them and
mean the same thing. Lives on the engine side: the operator's tests never import torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flotilla.engine.cli import build_parser, engine_args_from_cli
from flotilla.operator.render import engine_args
from flotilla.operator.spec import parse_service

SAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "samples"


def _service(path: Path):
    body = next(d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "InferenceService")
    body.setdefault("metadata", {}).setdefault("namespace", "default")
    body["metadata"].setdefault("uid", "00000000-0000-0000-0000-000000000000")
    return parse_service(body, "flotilla-engine:test")


@pytest.mark.parametrize("sample", sorted(p.name for p in SAMPLES.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_every_sample_renders_arguments_the_engine_parses(sample):
    svc = _service(SAMPLES / sample)
    ns = build_parser().parse_args(engine_args(svc))
    assert ns.command == "serve" and ns.port == 8000 and ns.host == "0.0.0.0"
    assert ns.served_model_name == [svc.served_model_name]
    args = engine_args_from_cli(ns) if ns.kv_cache_dtype == "auto" else None
    if args is not None:
        assert args.tensor_parallel_size == svc.engine.tensor_parallel_size
        assert args.max_num_seqs == svc.engine.max_num_seqs
        assert args.enable_prefix_caching == svc.engine.enable_prefix_caching
        assert args.enable_chunked_prefill == svc.engine.enable_chunked_prefill
        assert args.max_model_len == svc.engine.max_model_len


def test_disabled_features_reach_the_engine_as_disabled():
    body = yaml.safe_load((SAMPLES / "smollm2-cpu.yaml").read_text())
    body["metadata"]["namespace"] = "default"
    body["metadata"]["uid"] = "u"
    body["spec"]["engine"].update(enablePrefixCaching=False, enableChunkedPrefill=False, maxNumBatchedTokens=4096)
    args = engine_args_from_cli(build_parser().parse_args(engine_args(parse_service(body, "img"))))
    assert args.enable_prefix_caching is False and args.enable_chunked_prefill is False


def test_engine_refuses_what_it_cannot_do_yet():
    body = yaml.safe_load((SAMPLES / "llama-70b-tp4.yaml").read_text().split("---")[-1])
    body["metadata"].update(namespace="default", uid="u")
    body["spec"]["engine"]["kvCacheDtype"] = "fp8"
    with pytest.raises(SystemExit, match="kv-cache-dtype fp8"):
        engine_args_from_cli(build_parser().parse_args(engine_args(parse_service(body, "img"))))
