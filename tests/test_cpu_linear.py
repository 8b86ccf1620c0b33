"""The CPU's oneDNN-packed projections (``engine.layers.linear.pack_for_cpu``) against ``F.linear`` on the plain
weight, and what packing keeps and drops in a loaded model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flotilla.engine.layers.linear import (
    PackedColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    pack_for_cpu,
)

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")

# fp32: oneDNN and MKL sum in different orders (~1e-6 relative); bf16: both accumulate in fp32 and round once.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_projections_compute_what_linear_computes(dtype, bias):
    g = torch.Generator().manual_seed(0)
    column = PackedColumnParallelLinear(96, {"q": (0, 64), "k": (0, 32)}, bias=bias)
    row = RowParallelLinear(96, 48, bias=bias)
    for layer in (column, row):
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        layer.to(dtype)
        weight = layer.weight.detach().clone()
        b = None if layer.bias is None else layer.bias.detach().clone()
        assert layer.pack_for_cpu()
        assert layer.packed is not None and layer.weight.numel() == 0 and layer.weight.dtype == dtype
        for rows in (1, 7, 64, 300):  # decode batches and a prefill chunk: one packed weight serves any M
            x = torch.randn(rows, 96, generator=g).to(dtype)
            torch.testing.assert_close(layer(x), F.linear(x, weight, b), atol=TOL[dtype], rtol=TOL[dtype])


def test_fp16_is_left_plain():
    layer = RowParallelLinear(32, 16, bias=False).to(torch.float16)
    assert not layer.pack_for_cpu()
    assert layer.packed is None and layer.weight.shape == (16, 32)


def test_a_loaded_model_packs_projections_and_keeps_embedding_rows_for_lookups(tiny_model):
    from flotilla.engine.model_loader import load_config, load_model, resolve_model

    source = resolve_model(str(tiny_model))
    config = load_config(source)
    model = load_model(source, config, torch.float32, torch.device("cpu"))
    layer = model.layers[0]
    mlp = layer.mlp  # dense, or a mixture of experts whose router is a projection (the experts stay stacked)
    projections = [mlp.gate_up_proj, mlp.down_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate]
    for proj in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, *projections):
        assert proj.packed is not None and proj.weight.numel() == 0  # the weights are held once
    embed = model.embed_tokens
    assert embed.packed is not None and embed.weight.shape == (config.vocab_size, config.hidden_size)
    hidden = embed(torch.tensor([3, 17, 5]))  # lookups read the plain rows
    if model.lm_head is None:  # tied: the packed copy of the same rows computes the logits
        expected = F.linear(hidden, embed.weight)
        if model.final_softcap is not None:  # Gemma 2 caps its logits
            expected = torch.tanh(expected / model.final_softcap) * model.final_softcap
        torch.testing.assert_close(model.compute_logits(hidden), expected, atol=1e-5, rtol=1e-5)
    else:  # untied: the head is only ever multiplied with, so only its packed form is kept
        assert model.lm_head.packed is not None and model.lm_head.weight.numel() == 0
        assert model.compute_logits(hidden).shape == (3, config.vocab_size)
