"""Shared set-up of the kernel tests. Import it before any Triton kernel: without CUDA it switches on the
interpreter, which Triton reads when a kernel is defined."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# fp32 and fp16 everywhere; bf16 only on a GPU, since the interpreter's bf16 arithmetic is wrong.
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16",
                 marks=pytest.mark.skipif(DEVICE != "cuda", reason="bf16 needs CUDA: the interpreter's bf16 is wrong")),
]
