"""Shared fixtures: tiny random Llama-family models saved as real Hugging Face folders, the bundled
SmolLM2, and the transformers oracle they are compared against."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VARIANTS = {
    # GQA 4:2, tied embeddings, plain RoPE
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # Qwen2: q/k/v bias, untied lm_head, no GQA
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    # Qwen3: per-head RMSNorm of q and k before RoPE, head_dim (32) apart from hidden / heads (16), tied embeddings
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  tie_word_embeddings=True),
    # Phi-3: q/k/v and gate/up fused in the checkpoint (qkv_proj, gate_up_proj)
    "phi3": dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    # Gemma: GeGLU (tanh GELU), RMSNorm scale stored as w for (1 + w), embeddings scaled by sqrt(hidden), 4:1 GQA
    "gemma": dict(model_type="gemma", num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                  tie_word_embeddings=True),
    # Gemma 2: sandwich norms, soft-capped scores (a cap of 1 bites) and logits, a 16-token window on layer 0 (of
    # [window, full]), queries scaled by query_pre_attn_scalar (not head_dim)
    "gemma2": dict(model_type="gemma2", num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   tie_word_embeddings=True, sliding_window=16, query_pre_attn_scalar=24, attn_logit_softcapping=1.0,
                   final_logit_softcapping=2.0),
    # Gemma 3 (text): q/k norms (1 + w), an 8-token window on layer 0, RoPE per layer kind (linear scaling globally)
    "gemma3": dict(model_type="gemma3_text", num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                   tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=24,
                   layer_types=["sliding_attention", "full_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}),
    # Mixtral: every MLP a mixture of 4 experts, top-2, weights renormalised
    "mixtral": dict(model_type="mixtral", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                    num_local_experts=4, num_experts_per_tok=2),
    # Qwen3-MoE: q/k norms, 8 experts top-2 renormalised (norm_topk_prob) in layer 0, a dense MLP in layer 1
    "qwen3_moe": dict(model_type="qwen3_moe", num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      tie_word_embeddings=True, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1]),
    # Qwen2-MoE: q/k/v bias, 4 experts top-2 not renormalised plus a sigmoid-gated shared expert, on every 2nd layer
    "qwen2_moe": dict(model_type="qwen2_moe", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=False,
                      shared_expert_intermediate_size=96, decoder_sparse_step=2),
    # Llama 3.1-style RoPE scaling and 4:1 GQA
    "llama3": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}),
}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test module may define ``explain_failure() -> str``: what it returns heads each failure's report (the
    node suite puts the cluster's state there: in CI's excerpt of the output, the why before the traceback)."""
    report = yield
    explain = getattr(item.module, "explain_failure", None)
    if report.failed and call.when == "call" and explain is not None:
        try:
            state = explain()
        except Exception as e:  # noqa: BLE001  (the failure itself must still be reported)
            state = f"(could not read the state: {type(e).__name__}: {e})"
        report.longrepr = f"{state}\n\n{report.longreprtext}"
    return report


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled GGUF, converted once to a Hugging Face folder (the same one the engine loads)."""
    from flotilla.engine.model_loader import bundled_model_path, convert_gguf

    return convert_gguf(Path(bundled_model_path()))


@pytest.fixture(scope="session")
def tokenizer(request):
    """SmolLM2's tokenizer (the tiny models share it). ``FLOTILLA_TEST_TOKENIZER`` names a folder holding it instead,
    for a machine without the bundled weights (the GPU machine: the tiny-model tests then run there)."""
    from transformers import AutoTokenizer

    folder = os.environ.get("FLOTILLA_TEST_TOKENIZER") or str(request.getfixturevalue("smollm2_dir"))
    return AutoTokenizer.from_pretrained(folder)


def build_tiny(variant: str, folder: Path, tokenizer, **overrides) -> Path:
    """A tiny random model of a TINY_VARIANTS entry (or any transformers ``model_type``), with config overrides."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 2, **TINY_VARIANTS.get(variant, {"model_type": variant}), **overrides}
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    config.architectures = [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
                             "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM",
                             "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                             "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                             "qwen3_moe": "Qwen3MoeForCausalLM"}.get(model_type, "LlamaForCausalLM")]
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # a wider init than the default makes greedy choices decisive (no near-ties)
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # not all ones: a misplaced norm must show
                p.normal_(1.0, 0.2)
            elif model_type.startswith("gemma") and name.endswith("norm.weight"):  # (1 + w): a missing 1 must show
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=sorted(TINY_VARIANTS))
def tiny_model(request, tmp_path_factory, tokenizer) -> Path:
    return build_tiny(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"), tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama-single"), tokenizer)


_HF_CACHE: dict[str, object] = {}


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    key = str(folder)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
    return _HF_CACHE[key]


def hf_greedy(folder: Path, prompt_ids: list[int], max_new_tokens: int, min_new_tokens: int | None = None) -> list[int]:
    """transformers' generate(), greedy, fp32, one prompt at a time (no padding). By default EOS is masked
    until ``max_new_tokens`` (the engine's ``min_tokens`` does the same)."""
    model = hf_model(folder)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if min_new_tokens is None else min_new_tokens, do_sample=False, pad_token_id=0,
        )
    return out[0, len(prompt_ids):].tolist()


def run_to_completion(engine, requests: dict) -> dict:
    """Queue ``{id: (prompt, SamplingParams)}`` on an ``LLMEngine`` and step until nothing is left; the finished
    outputs by id. While only grammars are compiling it waits on them instead of spinning."""
    from concurrent.futures import wait

    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        wait(engine.grammars_blocking())
    return done


def assert_pool_whole(engine) -> None:
    """No leaked or double-freed KV block once the engine is idle."""
    bm = engine.block_manager
    bm.check_integrity()
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} blocks leaked"
    swap = engine.scheduler.swap_pool
    if swap is not None:
        assert swap.num_free_blocks == swap.num_blocks, "host swap blocks leaked"
