"""Architectures: ModelRegistry (vLLM's ``register_model``, by class or by ``module:Class``), the refusal of what
nothing serves, sliding windows past the window, and what greedy tokens cannot show (soft-capped logits, RoPE per
layer kind), each checked against transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import build_tiny, hf_greedy
from flotilla.engine import LLM, ModelRegistry, SamplingParams
from flotilla.engine.models.llama import LlamaForCausalLM


class RenamedLlama(LlamaForCausalLM):
    """A user's own model class: here the Llama code under another architecture name."""


def renamed_copy(folder, tmp_path, architecture: str):
    copy = tmp_path / architecture
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = [architecture]
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def greedy(llm: LLM, prompt: list[int], n: int) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids


PROMPT = [5, 17, 42, 8, 99, 3, 61]


@pytest.mark.parametrize("how", ["class", "import path"])
def test_a_registered_architecture_is_served(tiny_llama, tmp_path, how):
    arch = f"RenamedLlama{'Lazy' if how == 'import path' else ''}ForCausalLM"
    folder = renamed_copy(tiny_llama, tmp_path, arch)
    with pytest.raises(ValueError, match=f"architecture {arch} is not supported.*register_model"):
        LLM(str(folder), dtype="float32")
    ModelRegistry.register_model(arch, RenamedLlama if how == "class" else "test_model_registry:RenamedLlama")
    assert arch in ModelRegistry.get_supported_archs()
    llm = LLM(str(folder), dtype="float32", max_model_len=128)
    assert type(llm.llm_engine.runner.model) is RenamedLlama
    assert greedy(llm, PROMPT, 12) == hf_greedy(tiny_llama, PROMPT, 12)


@pytest.mark.parametrize("model", [42, "no_colon", "a:b:c", object])
def test_a_registration_that_names_no_model_class_is_refused(model):
    with pytest.raises(ValueError, match="model"):
        ModelRegistry.register_model("Whatever", model)


def test_a_lazy_registration_that_cannot_import_fails_when_used(tiny_llama, tmp_path):
    ModelRegistry.register_model("MissingForCausalLM", "no_such_module_here:Model")
    folder = renamed_copy(tiny_llama, tmp_path, "MissingForCausalLM")
    with pytest.raises(ValueError, match="cannot import no_such_module_here:Model"):
        LLM(str(folder), dtype="float32")


@pytest.mark.parametrize("variant,overrides", [
    ("mistral", dict(sliding_window=16)),  # every layer windowed (Mistral v0.1)
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),  # layer 1 windowed, 0 full
])
def test_sliding_window_models_attend_within_their_window_past_it(tmp_path, tokenizer, variant, overrides):
    """Contexts three times the window, through chunks of 24 tokens and decode: transformers' tokens (it applies
    the window too)."""
    folder = build_tiny(variant, tmp_path / variant, tokenizer, num_attention_heads=4, num_key_value_heads=2,
                        **overrides)
    llm = LLM(str(folder), dtype="float32", max_num_batched_tokens=24)
    assert llm.llm_engine.scheduler_config.max_model_len == 512  # the window no longer caps the context
    windows = [layer.self_attn.attn.options.get("window") for layer in llm.llm_engine.runner.model.layers]
    assert windows == ([16, 16] if variant == "mistral" else [None, 16])
    prompts = [PROMPT, PROMPT * 5]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(folder, prompt, 30)
    assert_prompt_logprobs_match(llm, folder)  # every prompt position, chunks straddling the window


def test_chat_passes_tools_and_template_kwargs_to_the_template(tiny_llama, tokenizer):
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{{ greeting }}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    llm = LLM(str(tiny_llama), dtype="float32", max_model_len=128)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1), use_tqdm=False,
                   chat_template=template, tools=tools, chat_template_kwargs={"greeting": "hello "})
    assert out[0].prompt_token_ids == tokenizer.encode("[get_weather]hello hi", add_special_tokens=False)


def test_each_gated_activation_is_transformers_own():
    """The MLP's activation per ``hidden_act`` (Gemma's tanh GELU among them), against transformers' ACT2FN: the
    greedy family tests cannot tell the tanh GELU from the exact one, this can."""
    from transformers.activations import ACT2FN

    from flotilla.engine.layers.activation import GATED_ACTIVATIONS

    x = 3 * torch.randn(5, 2 * 24, generator=torch.Generator().manual_seed(0))
    gate, up = x.chunk(2, dim=-1)
    for name, fn in GATED_ACTIVATIONS.items():
        torch.testing.assert_close(fn(x), ACT2FN[name](gate) * up, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("damage", ["missing", "extra expert"])
def test_a_mixture_of_experts_checkpoint_that_does_not_match_fails_loudly(tmp_path, tokenizer, damage):
    """Experts load one checkpoint tensor per expert and projection into stacked weights: one expert's up projection
    gone, or an expert the config does not have, is named at load rather than served as zeros or ignored."""
    from safetensors.torch import load_file, save_file

    folder = build_tiny("mixtral", tmp_path / "mixtral", tokenizer)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    if damage == "missing":
        del tensors[name]
        expected = r"checkpoint lacks tensors for: \['layers.1.mlp.experts.w13'\]"
    else:
        tensors[name.replace(".2.", ".4.")] = tensors[name].clone()
        expected = r"experts.4.w3.weight: no expert weight '4.up' \(4 experts\)"
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=expected):
        LLM(str(folder), dtype="float32")


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_windowed_soft_capped_families_match_transformers_log_probabilities(tmp_path, tokenizer, variant):
    """Greedy tokens cannot see everything: a soft cap on the logits never changes their order. Prompt logprobs at
    every position of a prompt four times the window long, with prefill chunks that straddle the window, against
    transformers' log-softmax of its own logits."""
    folder = build_tiny(variant, tmp_path / variant, tokenizer)
    assert_prompt_logprobs_match(LLM(str(folder), dtype="float32", max_num_batched_tokens=24), folder)


def assert_prompt_logprobs_match(llm: LLM, folder, length: int = 64) -> None:
    """The log-probability of every next prompt token, ours against transformers' log-softmax of its logits."""
    from conftest import hf_model

    prompt = [(13 * i + 7) % 4000 + 3 for i in range(length)]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    ours = torch.tensor([lp[tok].logprob for lp, tok in zip(out.prompt_logprobs[1:], prompt[1:])])
    with torch.no_grad():
        logits = hf_model(folder)(torch.tensor([prompt])).logits[0, :-1]
    theirs = torch.log_softmax(logits.float(), dim=-1)[torch.arange(length - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def _longrope_phi3(tmp_path, tokenizer):
    """A tiny Phi-3 of the 128k kind: pretrained on 32 positions, extended to 128, with short and long factor sets
    far enough apart (and an attention factor of sqrt(1 + ln 4 / ln 32)) that a wrong choice shows in every logprob."""
    rotated = 16 // 2  # hidden 64 / 4 heads
    scaling = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
               "short_factor": [1.0 + 0.25 * i for i in range(rotated)],
               "long_factor": [1.0 + 3.0 * i for i in range(rotated)]}
    return build_tiny("phi3", tmp_path / "phi3-longrope", tokenizer, max_position_embeddings=128,
                      original_max_position_embeddings=32, rope_parameters=scaling)


@pytest.mark.parametrize("max_model_len,tp", [(128, 1), (32, 1), (32, 2)])
def test_longrope_uses_one_factor_set_chosen_by_the_served_context(tmp_path, tokenizer, max_model_len, tp):
    """LongRoPE (Phi-3-128k) has a short factor set for the pretrained context and a long one past it. Like vLLM, the
    engine picks one set for every token by the served context (transformers picks per forward call, which would
    rotate cached keys and later queries differently once a sequence crosses the threshold). Each choice is checked
    where transformers makes the same one: a context past 32 (long) against transformers on sequences past 32, a
    context of 32 (short, on both tensor-parallel ranks) against sequences within it; prompt logprobs at every
    position, prefill chunks of 24, and greedy decode."""
    folder = _longrope_phi3(tmp_path, tokenizer)
    llm = LLM(str(folder), dtype="float32", max_model_len=max_model_len, max_num_batched_tokens=24,
              tensor_parallel_size=tp)
    long = max_model_len > 32
    try:
        assert_prompt_logprobs_match(llm, folder, length=48 if long else 31)
        prompt = PROMPT * 5 if long else PROMPT  # 35 tokens: past the threshold from transformers' first call on
        steps = 40 if long else 32 - len(PROMPT)
        out = llm.generate({"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == hf_greedy(folder, prompt, steps)
    finally:
        llm.llm_engine.shutdown()


def test_partial_rotary_turns_only_the_first_features_of_each_head(tmp_path, tokenizer):
    """``partial_rotary_factor`` (Phi-4-mini's 3/4): RoPE turns the first half of each head here, the rest passes
    through; transformers' prompt logprobs and greedy tokens."""
    folder = build_tiny("phi3", tmp_path / "phi3-partial", tokenizer, partial_rotary_factor=0.5)
    llm = LLM(str(folder), dtype="float32", max_num_batched_tokens=24)
    assert_prompt_logprobs_match(llm, folder)
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(folder, PROMPT, 20)
