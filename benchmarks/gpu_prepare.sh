#!/usr/bin/env bash
# Run HERE (no GPU needed), before a session's device call: puts in .gpu/ what the GPU machine lacks and
# benchmarks/gpu_session.sh reads, and keeps it out of git. The machine has torch, triton, transformers, pytest,
# pytest-xdist and pytest-timeout but no network and no bundled SmolLM2; the phases need only its tokenizer
# (the tiny test models and the 8B-shaped benchmark use it). Then, in one device call:
#   run(command="benchmarks/gpu_session.sh info graphs piecewise throughput", carry=[".gpu"], timeout_s=560)
# (transformers' baseline is left out there unless HF=1; see gpu_session.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
PY=${PY:-.venv/bin/python}
mkdir -p .gpu
# From /tmp: Python run from the checkout's root would put its folders on sys.path.
(cd /tmp && "$OLDPWD/$PY" - "$OLDPWD/.gpu/tokenizer" <<'PYEOF'
import sys
from pathlib import Path
from transformers import AutoTokenizer
from flotilla.engine.model_loader import bundled_model_path, convert_gguf
folder = convert_gguf(Path(bundled_model_path()))
AutoTokenizer.from_pretrained(folder).save_pretrained(sys.argv[1])
print("tokenizer:", sys.argv[1], "from", folder)
PYEOF
)
du -sh .gpu
