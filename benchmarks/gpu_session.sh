#!/usr/bin/env bash
# Issue 12's checks and benchmarks on a lent GPU machine, in one command (it has torch, triton and transformers,
# no network): benchmarks/gpu_session.sh PHASE...   with PHASE one of
#   info        the GPU, driver and versions
#   tests       the kernel tests (fp16/bf16 on CUDA) and the engine's exactness tests (fp32, token for token)
#   graphs      the CUDA-graph tests alone (full decode graphs and piecewise graphs, token-exact against eager)
#   kernels     benchmarks/kernels.py (decode bandwidth vs copy, prefill vs SDPA)
#   sweep       benchmarks/kernels.py --sweep (the kernels' launch shapes)
#   prefill     prefill attention alone: its tests on CUDA, its TFLOP/s against SDPA, its launch-shape sweep (~4 min)
#   agreement   benchmarks/gpu_agreement.py (bf16 top-1 agreement with transformers)
#   throughput  benchmarks/offline_throughput.py, Llama-3.1-8B shape (dummy weights), 1,000 ShareGPT-like prompts;
#               transformers' generate() on the first 64 too only with HF=1 (about two minutes; measured at 95x)
#   eager       the same with --enforce-eager (no CUDA graphs)
#   piecewise   the same with --compilation-config '{"cudagraph_mode": "FULL_AND_PIECEWISE"}' (steps with prompts
#               replay piecewise graphs too)
# TOKENIZER (default .gpu/tokenizer): a folder with SmolLM2's tokenizer files (the GPU machine lacks the bundled
# GGUF): benchmarks/gpu_prepare.sh makes it here, and the device call carries .gpu. Results go to $OUT (default
# /tmp/gpu-out). A session has 15 minutes of device time, the machine's start included: the next one runs
#   benchmarks/gpu_session.sh info graphs piecewise throughput      (about 6 minutes; each phase has a timeout)
# and, in a second call if the time allows, benchmarks/gpu_session.sh prefill
set -u
OUT=${OUT:-/tmp/gpu-out}
TOKENIZER=${TOKENIZER:-.gpu/tokenizer}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
ALL_TESTS="tests/test_kernels_attention.py tests/test_kernels_cache.py tests/test_kernels_elementwise.py
  tests/test_kernels_engine.py tests/test_paged_attention_ref.py tests/test_engine_exactness.py
  tests/test_prefix_chunk_preempt.py tests/test_cuda_graphs.py tests/test_piecewise_graphs.py"
THROUGHPUT=(benchmarks/offline_throughput.py --model benchmarks/configs/llama-3.1-8b --load-format dummy
            --tokenizer "$TOKENIZER" --no-detokenize --workload sharegpt --num-seqs 1000 --dtype bfloat16
            --hf-subset 64 --hf-batch 64 --step-breakdown)
if [ "${HF:-0}" = 1 ]; then SKIP=(--skip vllm); else SKIP=(--skip vllm hf); fi

pytest_phase() {  # NAME TIMEOUT FILES...: the files' tests on CUDA (tiny models), the log in $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  FLOTILLA_TEST_TOKENIZER=$TOKENIZER timeout "$limit" python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 150 \
    --tb=short -rfE --durations=8 -m "not smollm2" "$@" > "$OUT/$name.log" 2>&1
  echo "pytest exit $?"; grep -E "passed|failed|error" "$OUT/$name.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/$name.log" | head -30; grep -A10 "slowest" "$OUT/$name.log"
}

throughput_phase() {  # NAME ARGS...: the 8B-shaped run with ARGS, its figures in $OUT/NAME.json
  local name=$1; shift
  timeout "${THROUGHPUT_TIMEOUT:-180}" python3 "${THROUGHPUT[@]}" "$@" --json "$OUT/$name.json" \
    ${THROUGHPUT_EXTRA:-} 2>&1 | tail -25
}

for phase in "$@"; do
  echo "=== $phase $(date +%T)"
  case $phase in
    info)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      python3 -c "import torch, triton, transformers, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)" ;;
    tests) pytest_phase tests "${TESTS_TIMEOUT:-300}" ${TESTS:-$ALL_TESTS} ;;
    graphs) pytest_phase graphs "${GRAPHS_TIMEOUT:-150}" tests/test_cuda_graphs.py tests/test_piecewise_graphs.py ;;
    sweep)
      timeout 300 python3 benchmarks/kernels.py --dtype bfloat16 --sweep --json "$OUT/sweep.json" 2>&1 | tail -16 ;;
    prefill)
      pytest_phase prefill_tests 120 tests/test_kernels_attention.py -k prefill
      timeout 100 python3 benchmarks/kernels.py --dtype bfloat16 --only prefill --json "$OUT/prefill.json" 2>&1 \
        | tail -14
      timeout 200 python3 benchmarks/kernels.py --dtype bfloat16 --only prefill --sweep \
        --json "$OUT/prefill_sweep.json" 2>&1 | tail -8 ;;
    kernels)
      timeout 200 python3 benchmarks/kernels.py --dtype bfloat16 --json "$OUT/kernels.json" 2>&1 | tail -45 ;;
    agreement)
      timeout 150 python3 benchmarks/gpu_agreement.py --tokenizer "$TOKENIZER" --json "$OUT/agreement.json" 2>&1 | tail -8 ;;
    throughput) throughput_phase throughput "${SKIP[@]}" ;;
    eager) throughput_phase throughput_eager --skip vllm hf --enforce-eager ;;
    piecewise)
      throughput_phase throughput_piecewise --skip vllm hf --compilation-config '{"cudagraph_mode": "FULL_AND_PIECEWISE"}' ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
