"""Embeddings (the pooling runner): ``LLM.embed`` and ``/v1/embeddings`` against transformers' own hidden states
pooled the same way (cosine >= 0.99999), for each pooling type and where it is read from (sentence-transformers
files, ``pooler_config``), through chunked prefill, prefix caching, preemption and two ranks; the server through the
openai SDK (its default base64 encoding and floats); and the refusals a user can meet."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny
from flotilla.engine import LLM, PoolingParams, SamplingParams
from server_process import serving

KEY = "embed-key"
PROMPTS = [[5, 17, 42, 8, 99, 3, 61] * 5, [7, 8, 9], list(range(100, 140)), [11] * 20]


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory, tokenizer) -> Path:
    return build_tiny("qwen3", tmp_path_factory.mktemp("embed-qwen3"), tokenizer)


def with_sentence_transformers(folder: Path, tmp_path: Path, mode: str, normalize: bool) -> Path:
    """A copy of ``folder`` with sentence-transformers' files: a Pooling module set to ``mode`` (and Normalize)."""
    import shutil

    copy = tmp_path / f"st-{mode}-{normalize}"
    shutil.copytree(folder, copy)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (copy / "modules.json").write_text(json.dumps(modules))
    (copy / "1_Pooling").mkdir()
    flags = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": False}
    flags[mode] = True
    (copy / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **flags}))
    return copy


def reference(folder: Path, prompt: list[int], pooling: str, normalize: bool, dimensions: int | None = None):
    """transformers' final hidden states (after the last norm) pooled: the oracle."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([prompt])).last_hidden_state[0]
    v = {"LAST": hidden[-1], "MEAN": hidden.mean(0), "CLS": hidden[0]}[pooling]
    if dimensions is not None:
        v = v[:dimensions]
    return F.normalize(v, dim=-1) if normalize else v


def assert_same(embedding: list[float], ref: torch.Tensor) -> None:
    got = torch.tensor(embedding)
    assert got.shape == ref.shape
    assert F.cosine_similarity(got, ref, dim=0).item() >= 0.99999
    torch.testing.assert_close(got.norm(), ref.norm(), atol=1e-4, rtol=1e-4)  # normalised or not, as the ref


def embed_all(llm: LLM, prompts=PROMPTS, params: PoolingParams | None = None) -> list[list[float]]:
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs.embedding for o in outs]


def test_last_token_pooling_of_a_causal_lm_through_chunked_prefill(tiny_qwen3):
    """runner="pooling" on a ...ForCausalLM checkpoint (as Qwen3-Embedding is): by default the last token's state,
    normalised. A 16-token budget splits the long prompts over steps, beside the short ones."""
    llm = LLM(str(tiny_qwen3), dtype="float32", runner="pooling", max_num_batched_tokens=16)
    for prompt, emb in zip(PROMPTS, embed_all(llm)):
        assert_same(emb, reference(tiny_qwen3, prompt, "LAST", True))
    # A prefix-cache hit (the first 32 tokens are cached now) computes only the rest; the last token is the same.
    (out,) = llm.embed({"prompt_token_ids": PROMPTS[0]}, use_tqdm=False)
    assert llm.llm_engine.block_manager.prefix_hits > 0
    assert_same(out.outputs.embedding, reference(tiny_qwen3, PROMPTS[0], "LAST", True))


@pytest.mark.parametrize("mode,pooling", [("pooling_mode_mean_tokens", "MEAN"), ("pooling_mode_cls_token", "CLS"),
                                          ("pooling_mode_lasttoken", "LAST")])
@pytest.mark.parametrize("normalize", [True, False])
def test_pooling_read_from_sentence_transformers_files(tiny_qwen3, tmp_path, mode, pooling, normalize):
    """modules.json names the Pooling module whose config sets the mode, and Normalize if present. MEAN and CLS read
    every chunk of the prompt (prefix caching is off for them), so the long prompts are chunked here too."""
    folder = with_sentence_transformers(tiny_qwen3, tmp_path, mode, normalize)
    llm = LLM(str(folder), dtype="float32", runner="pooling", max_num_batched_tokens=16)
    assert llm.llm_engine.cache_config.enable_prefix_caching == (pooling == "LAST")
    first, again = embed_all(llm), embed_all(llm)  # again: LAST finds its prefixes cached, the others compute all
    for prompt, emb, emb_again in zip(PROMPTS, first, again):
        ref = reference(folder, prompt, pooling, normalize)
        assert_same(emb, ref)
        assert_same(emb_again, ref)


def test_pooler_config_overrides_the_model_files(tiny_qwen3, tmp_path):
    folder = with_sentence_transformers(tiny_qwen3, tmp_path, "pooling_mode_cls_token", True)
    llm = LLM(str(folder), dtype="float32", runner="pooling", max_num_batched_tokens=16,
              pooler_config='{"pooling_type": "MEAN", "normalize": false}')
    for prompt, emb in zip(PROMPTS, embed_all(llm)):
        assert_same(emb, reference(folder, prompt, "MEAN", False))


@pytest.mark.parametrize("pooling", ["MEAN", "CLS", "LAST"])
def test_a_prompt_computed_again_from_its_start_is_pooled_once(pooling):
    """A preempted prompt (recompute) runs again from token 0: the chunk that restarts it resets what the earlier
    chunks added, so a mean counts each token once and CLS takes the recomputed first row."""
    from flotilla.engine.pooling import PoolerConfig, PoolingState, chunk_partial

    hidden = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    state = PoolingState(PoolerConfig(pooling, normalize=False), PoolingParams())
    for a, b in [(0, 4), (4, 7)]:  # computed up to token 7, then preempted
        state.add(chunk_partial(hidden[a:b] * 3, pooling, a == 0), b - a, a == 0)  # stale values must not survive
    for a, b in [(0, 4), (4, 8), (8, 10)]:
        state.add(chunk_partial(hidden[a:b], pooling, a == 0), b - a, a == 0)
    want = {"MEAN": hidden.mean(0), "CLS": hidden[0], "LAST": hidden[-1]}[pooling]
    torch.testing.assert_close(torch.tensor(state.finish()), want)


def test_a_bare_decoder_checkpoint_gets_the_pooling_runner_by_itself(tmp_path, tokenizer):
    """An embedding model saved without an LM head ("Qwen3Model": tensor names without "model.", no lm_head) is
    served by runner="auto" as pooling; asking it to generate is refused."""
    from transformers import AutoModel

    causal = build_tiny("qwen3", tmp_path / "causal", tokenizer, tie_word_embeddings=False)
    bare = tmp_path / "bare"
    AutoModel.from_pretrained(str(causal), dtype=torch.float32).save_pretrained(bare)
    tokenizer.save_pretrained(bare)
    assert json.loads((bare / "config.json").read_text())["architectures"] == ["Qwen3Model"]
    llm = LLM(str(bare), dtype="float32")
    assert llm.llm_engine.runner_type == "pooling"
    for prompt, emb in zip(PROMPTS, embed_all(llm)):
        assert_same(emb, reference(bare, prompt, "LAST", True))
    with pytest.raises(ValueError, match="runs the pooling runner"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="Qwen3Model has no language-model head"):
        LLM(str(bare), dtype="float32", runner="generate")


def test_matryoshka_dimensions_truncate_before_normalising(tiny_qwen3, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="does not support Matryoshka"):
        LLM(str(tiny_qwen3), dtype="float32", runner="pooling").embed([1, 2, 3], PoolingParams(dimensions=16))
    folder = tmp_path / "matryoshka"
    shutil.copytree(tiny_qwen3, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [16, 32, 64]}))
    llm = LLM(str(folder), dtype="float32", task="embed")  # vLLM's older spelling
    (emb,) = embed_all(llm, PROMPTS[:1], PoolingParams(dimensions=16))
    assert_same(emb, reference(folder, PROMPTS[0], "LAST", True, dimensions=16))
    with pytest.raises(ValueError, match=r"dimensions: must be one of \[16, 32, 64\], got 20"):
        llm.embed([1, 2, 3], PoolingParams(dimensions=20))


def test_embeddings_over_two_ranks(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), dtype="float32", runner="pooling", tensor_parallel_size=2, max_num_batched_tokens=16)
    try:
        for prompt, emb in zip(PROMPTS, embed_all(llm)):
            assert_same(emb, reference(tiny_qwen3, prompt, "LAST", True))
    finally:
        llm.llm_engine.shutdown()


def test_a_generating_engine_refuses_embeddings_and_a_bad_pooler_config_is_named(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), dtype="float32")
    with pytest.raises(ValueError, match="embeddings need the pooling runner: start the model with --runner pooling"):
        llm.embed([1, 2, 3])
    with pytest.raises(ValueError, match="pooling_type must be one of"):
        LLM(str(tiny_qwen3), dtype="float32", runner="pooling", pooler_config={"pooling_type": "MAX"})
    with pytest.raises(ValueError, match="task 'embed' contradicts runner 'generate'"):
        LLM(str(tiny_qwen3), dtype="float32", runner="generate", task="embed")


# ---- the server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_server(tiny_qwen3):
    with serving([str(tiny_qwen3), "--runner", "pooling", "--dtype", "float32", "--served-model-name", "emb"],
                 KEY) as proc:
        yield proc


def test_openai_sdk_embeddings_base64_and_float(embedding_server, tiny_qwen3, tokenizer):
    client = openai.OpenAI(base_url=f"{embedding_server.base}/v1", api_key=KEY, max_retries=0, timeout=120)
    texts = ["The harbour was full of small boats.", "A flotilla of ships", "x"]
    # The SDK asks for base64 by default and decodes the float32 bytes itself.
    resp = client.embeddings.create(model="emb", input=texts)
    floats = client.embeddings.create(model="emb", input=texts, encoding_format="float")
    ids = [tokenizer.encode(t) for t in texts]
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(len(i) for i in ids)
    assert [d.index for d in resp.data] == [0, 1, 2] and resp.model == "emb"
    for d, f, prompt in zip(resp.data, floats.data, ids):
        assert_same(d.embedding, reference(tiny_qwen3, prompt, "LAST", True))
        torch.testing.assert_close(torch.tensor(d.embedding), torch.tensor(f.embedding))  # float32 round trip
    (one,) = client.embeddings.create(model="emb", input=ids[1], encoding_format="float").data  # token ids
    assert_same(one.embedding, reference(tiny_qwen3, ids[1], "LAST", True))


@pytest.mark.parametrize("body,status,param", [
    ({"input": "hi", "dimensions": 8}, 400, "dimensions"),
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": []}, 400, "input"),
    ({"input": "hi", "model": "other"}, 404, "model"),
])
def test_bad_embedding_requests_get_openai_errors_and_the_server_goes_on(embedding_server, body, status, param):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{embedding_server.base}/v1/embeddings", json=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    ok = httpx.post(f"{embedding_server.base}/v1/embeddings", json={"input": "still here"}, headers=headers, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 64


def test_the_pooling_server_refuses_completions_and_needs_the_key(embedding_server):
    r = httpx.post(f"{embedding_server.base}/v1/completions", json={"prompt": "hi"},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400 and "pooling runner" in r.json()["error"]["message"]
    assert httpx.post(f"{embedding_server.base}/v1/embeddings", json={"input": "hi"}, timeout=60).status_code == 401
