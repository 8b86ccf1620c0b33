"""End to end: the engine on the tiny Llama with every Triton kernel forced (under the interpreter on
the CPU), and with the compiled CPU kernels, generates exactly the greedy tokens of the torch reference
path — through fresh prefill, chunked prefill over cached context, prefix-cache hits, and batched decode."""

from __future__ import annotations

import pytest
import torch

import kernel_cases  # noqa: E402,F401  (first: it sets TRITON_INTERPRET)

from flotilla.engine import LLM, SamplingParams  # noqa: E402
from flotilla.engine.attention import (  # noqa: E402
    BACKEND_ENV,
    CompiledCpuBackend,
    TorchReferenceBackend,
    TritonBackend,
    select_backend,
)
from flotilla.kernels.elementwise import ELEMENTWISE_ENV  # noqa: E402
from flotilla.kernels.moe import MOE_ENV  # noqa: E402
from conftest import build_tiny  # noqa: E402


def test_backend_selection_defaults_to_compiled_kernels_on_cpu_and_obeys_overrides(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # forcing Triton on CPU tensors needs it (set already without CUDA)
    cpu = torch.device("cpu")
    assert isinstance(select_backend(cpu), CompiledCpuBackend)  # the suite's machines have a C++ compiler
    assert isinstance(select_backend(cpu, "torch"), TorchReferenceBackend)
    assert isinstance(select_backend(cpu, "triton"), TritonBackend)  # allowed: TRITON_INTERPRET is set here
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert isinstance(select_backend(cpu), TritonBackend)
    assert isinstance(select_backend(cpu, "torch"), TorchReferenceBackend)  # an explicit name wins
    if torch.cuda.is_available():
        monkeypatch.delenv(BACKEND_ENV)
        assert isinstance(select_backend(torch.device("cuda")), TritonBackend)
        with pytest.raises(ValueError, match="CPU tensors"):
            select_backend(torch.device("cuda"), "cpu")
    with pytest.raises(ValueError):
        select_backend(cpu, "flash")


def test_forcing_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        select_backend(torch.device("cpu"), "triton")


def _run(folder, backend: str, monkeypatch, elementwise: str | None = None) -> list[list[int]]:
    monkeypatch.setenv(BACKEND_ENV, backend)
    monkeypatch.setenv(ELEMENTWISE_ENV, elementwise or backend)
    # A 16-token budget chunks the 30-token prompt: its second chunk attends to cached context.
    # The compiled kernels run on CPU tensors: on a GPU machine too, that engine is put on the CPU.
    device = "cpu" if backend == "cpu" else "auto"
    llm = LLM(str(folder), dtype="float32", max_num_batched_tokens=16, enable_prefix_caching=True, device=device)
    assert llm.llm_engine.runner.backend.name == backend
    vocab = llm.llm_engine.model_config.vocab_size
    long_prompt = [(7 * i + 3) % vocab for i in range(30)]
    short_prompt = [5, 9, 11, 200, 17]
    params = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4)
    first = llm.generate([{"prompt_token_ids": long_prompt}, {"prompt_token_ids": short_prompt}], params,
                         use_tqdm=False)
    # Shares the long prompt's first full block: a prefix-cache hit, then a paged prefill of the rest.
    (second,) = llm.generate([{"prompt_token_ids": long_prompt[:16] + [42, 43, 44]}], params, use_tqdm=False)
    assert second.num_cached_tokens == 16
    return [o.outputs[0].token_ids for o in [*first, second]]


def test_engine_with_triton_kernels_generates_the_reference_greedy_tokens(tiny_llama, monkeypatch):
    reference = _run(tiny_llama, "torch", monkeypatch)
    assert _run(tiny_llama, "triton", monkeypatch) == reference


def test_engine_with_compiled_cpu_kernels_generates_the_reference_greedy_tokens(tiny_llama, monkeypatch):
    reference = _run(tiny_llama, "torch", monkeypatch)
    assert _run(tiny_llama, "cpu", monkeypatch, elementwise="torch") == reference


def test_engine_with_the_fused_moe_kernel_generates_the_reference_greedy_tokens(tmp_path, tokenizer, monkeypatch):
    """A Mixtral whose every MLP is a mixture of experts: the grouped-GEMM kernel, fed by the step's batches of
    prefill chunks and decode rows, picks the tokens the per-expert torch reference picks."""
    folder = build_tiny("mixtral", tmp_path / "mixtral", tokenizer)
    monkeypatch.setenv(MOE_ENV, "torch")
    reference = _run(folder, "torch", monkeypatch)
    monkeypatch.setenv(MOE_ENV, "triton")
    assert _run(folder, "triton", monkeypatch) == reference


def test_engine_with_triton_kernels_on_windowed_soft_capped_gemma2(tmp_path, tokenizer, monkeypatch):
    """Gemma 2's windowed layer (16 keys) and soft-capped scores through the Triton kernels: the 30-token prompt's
    second chunk and the decodes see past the window."""
    folder = build_tiny("gemma2", tmp_path / "gemma2", tokenizer)
    reference = _run(folder, "torch", monkeypatch)
    assert _run(folder, "triton", monkeypatch) == reference
