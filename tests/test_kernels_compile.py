"""Every Triton kernel compiles for an H100 (sm_90) on this GPU-less machine, at the launch shapes CUDA uses.

The kernel tests here run under Triton's interpreter, which checks the arithmetic but compiles nothing: a kernel the
interpreter runs can still be refused by the compiler (a loop-carried value whose type changes, a layout the code
generator cannot build) or ask for more shared memory than the GPU has, and that would first show on a lent GPU,
whose minutes are few. ``benchmarks/kernels_compile.py`` runs each launcher, catches its launch and compiles it to a
cubin with the ptxas that ships in Triton's wheel; here in a subprocess, because this suite's interpreter setting
would leave nothing to compile."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (with ptxas) is not installed")
def test_every_triton_kernel_compiles_for_the_h100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels_compile.py"), "--arch", "90",
                           "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    compiled = {row["kernel"] for row in json.loads(out.read_text())["kernels"]}
    # Every kernel defined in kernels/ is among them, so a new kernel cannot skip this check.
    defined = set()
    for source in (ROOT / "kernels").glob("triton_*.py"):
        defined |= set(re.findall(r"@triton\.jit[^\n]*\ndef (\w+_kernel)\(", source.read_text()))
    assert len(defined) >= 9
    assert defined <= compiled, f"not compiled: {sorted(defined - compiled)}"
