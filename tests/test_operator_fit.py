"""The fit check and the weight-size arithmetic: parameter counts match the published ones, specs that
cannot fit are caught with the arithmetic shown, and the startup budget grows with the weights."""
from __future__ import annotations

import pytest

from flotilla.operator.fit import (
    STARTUP_UNKNOWN_SECONDS, ModelShape, check_fit, gpu_memory_from_nodes, kv_bytes_per_token,
    parameters_from_name, startup_budget_seconds)
from flotilla.operator.spec import parse_service
from operator_fixtures.oracle import model_config
from test_operator_crd import sample_services

GiB = 2**30


def service(uri="meta-llama/Llama-3.1-8B-Instruct", **spec) -> object:
    return parse_service({"metadata": {"name": "m", "namespace": "ns"},
                          "spec": {"model": {"uri": uri}, **spec}})


# Published parameter counts (Hugging Face model cards / safetensors metadata).
@pytest.mark.parametrize("name,published", [("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496),
                                            ("smollm2-135m", 134_515_008), ("qwen2.5-7b", 7_615_616_512),
                                            ("mixtral-8x7b", 46_702_792_704), ("qwen3-30b-a3b", 30_532_122_624),
                                            ("qwen1.5-moe-a2.7b", 14_315_784_192)])
def test_parameter_count_matches_the_published_count(name, published):
    assert ModelShape.from_config(model_config(name)).parameters == published


@pytest.mark.parametrize("name,overrides", [
    ("qwen3-30b-a3b", {"mlp_only_layers": [0, 5, 47], "decoder_sparse_step": 2}),  # dense layers among sparse ones
    ("qwen1.5-moe-a2.7b", {"decoder_sparse_step": 3, "qkv_bias": False}),
    ("mixtral-8x7b", {"num_local_experts": 4, "tie_word_embeddings": True}),
    ("qwen2.5-7b", {}),
])
def test_parameter_count_is_what_transformers_builds_from_the_config(name, overrides):
    """Against transformers' own model built from the config (on the meta device: shapes, no memory), including
    layouts no published model has."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {**model_config(name), **overrides}
    config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = sum(p.numel() for p in model.parameters())
    assert ModelShape.from_config(raw).parameters == expected


def test_kv_bytes_per_token_for_llama_8b_is_128_kib_in_bf16_and_half_in_fp8():
    shape = ModelShape.from_config(model_config("llama-3.1-8b"))
    # 2 (K and V) x 32 layers x 8 KV heads x 128 head dim x 2 bytes
    assert kv_bytes_per_token(service(), shape) == 131072
    assert kv_bytes_per_token(service(engine={"kvCacheDtype": "fp8"}), shape) == 65536


def test_8b_on_one_80gb_gpu_fits():
    report = check_fit(service(engine={"maxModelLen": 32768}), model_config("llama-3.1-8b"), 80 * GiB)
    assert report.verdict == "Fits"
    assert report.required_bytes == 8_030_261_248 * 2 + 131072 * 32768


def test_70b_on_one_80gb_gpu_does_not_fit_and_shows_the_arithmetic():
    svc = service("meta-llama/Llama-3.1-70B-Instruct", engine={"maxModelLen": 8192})
    report = check_fit(svc, model_config("llama-3.1-70b"), 80 * GiB)
    assert report.verdict == "DoesNotFit"
    assert report.required_bytes > report.available_bytes
    assert "141.1 GB" in report.message        # 70.55B params x 2 bytes
    assert "70.55B params" in report.message
    assert "8192-token sequence" in report.message
    assert "1 GPU x 85.9 GB x 0.9" in report.message


def test_70b_fits_on_four_80gb_gpus_with_tensor_parallelism():
    svc = service("meta-llama/Llama-3.1-70B-Instruct", engine={"tensorParallelSize": 4, "maxModelLen": 32768},
                  resources={"gpus": 4, "gpuMemoryBytes": "80Gi"})
    assert check_fit(svc, model_config("llama-3.1-70b"), None).verdict == "Fits"


def test_tensor_parallel_arithmetic_is_per_gpu_with_kv_heads_replicated_past_their_count():
    config = model_config("llama-3.1-70b")  # 8 KV heads
    shape = ModelShape.from_config(config)
    for tp, heads in ((4, 2), (8, 1), (16, 1)):  # 16 ranks > 8 KV heads: one replicated head each
        svc = service("meta-llama/Llama-3.1-70B-Instruct", engine={"tensorParallelSize": tp, "maxModelLen": 8192},
                      resources={"gpus": tp})
        report = check_fit(svc, config, 80 * GiB)
        per_token = 2 * shape.num_layers * heads * shape.head_dim * 2
        assert report.required_bytes == shape.parameters * 2 // tp + per_token * 8192
        assert report.available_bytes == int(80 * GiB * 0.9)  # one GPU's usable memory
        assert f"/ {tp} GPUs" in report.message and "per GPU" in report.message
    # the 70B sample (tensor parallel 4 on 80 GB GPUs) passes the per-GPU check as shipped
    sample = parse_service(next(b for n, b in sample_services() if n == "llama-70b-tp4.yaml"))
    assert sample.engine.tensor_parallel_size == 4
    assert check_fit(sample, config, 80 * GiB).verdict in ("Fits", "Tight")


def test_full_context_kv_cache_can_be_what_does_not_fit():
    # Weights alone (16 GB) fit in 24 GiB; the default 131072-token context needs 17 GB more of KV.
    short = check_fit(service(engine={"maxModelLen": 4096}), model_config("llama-3.1-8b"), 24 * GiB)
    full = check_fit(service(), model_config("llama-3.1-8b"), 24 * GiB)
    assert short.verdict in ("Fits", "Tight") and full.verdict == "DoesNotFit"
    assert "131072-token sequence" in full.message


def test_a_tight_fit_is_flagged():
    # 16.06 GB weights + 1.07 GB KV = 17.13 GB of 18 GiB x 0.95 = 18.36 GB usable: under 10 % headroom.
    svc = service(engine={"maxModelLen": 8192, "gpuMemoryUtilization": 0.95})
    report = check_fit(svc, model_config("llama-3.1-8b"), 18 * GiB)
    assert report.verdict == "Tight"
    assert "headroom" in report.message


def test_quantization_shrinks_the_weights():
    awq = service(engine={"maxModelLen": 8192, "quantization": "awq"})
    bf16 = service(engine={"maxModelLen": 8192})
    config = model_config("llama-3.1-8b")
    assert check_fit(awq, config, 12 * GiB).verdict == "Fits"
    assert check_fit(bf16, config, 12 * GiB).verdict == "DoesNotFit"


def test_unknown_without_config_or_gpu_memory_or_gpus():
    config = model_config("llama-3.1-8b")
    assert check_fit(service(), None, 80 * GiB).verdict == "Unknown"
    assert check_fit(service(), config, None).verdict == "Unknown"
    assert check_fit(service(resources={"gpus": 0}), config, 80 * GiB).verdict == "Unknown"


def test_gpu_memory_from_node_labels_takes_the_smallest_gpu():
    nodes = [{"nvidia.com/gpu.memory": "81559"}, {"nvidia.com/gpu.memory": "40960"}, {"other": "x"}]
    assert gpu_memory_from_nodes(nodes) == 40960 * 2**20
    assert gpu_memory_from_nodes([{"other": "x"}]) is None


@pytest.mark.parametrize("uri,params", [
    ("meta-llama/Llama-3.1-8B-Instruct", 8e9), ("HuggingFaceTB/SmolLM2-135M-Instruct", 135e6),
    ("mistralai/Mixtral-8x7B-v0.1", 56e9), ("Qwen/Qwen2.5-0.5B", 0.5e9), ("org/no-size-here", None)])
def test_parameters_from_the_model_name(uri, params):
    assert parameters_from_name(uri) == (int(params) if params else None)


def test_startup_budget_grows_with_the_weights_to_load():
    small = startup_budget_seconds(service("HuggingFaceTB/SmolLM2-135M-Instruct"), None)
    mid = startup_budget_seconds(service(), model_config("llama-3.1-8b"))
    big = startup_budget_seconds(service("meta-llama/Llama-3.1-70B-Instruct"), model_config("llama-3.1-70b"))
    assert small < mid < big
    assert small < 600            # not a fixed 10 minutes for a 270 MB model ...
    assert big > 2400             # ... and more than 40 minutes for 141 GB from the hub
    assert startup_budget_seconds(service("org/no-size-here"), None) == STARTUP_UNKNOWN_SECONDS


def test_startup_budget_is_shorter_from_a_pvc_than_from_the_hub():
    hub = startup_budget_seconds(service("meta-llama/Llama-3.1-70B"), None)
    pvc = startup_budget_seconds(service("pvc://weights/Llama-3.1-70B"), None)
    assert pvc < hub
