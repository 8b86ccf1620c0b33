"""Where the offline-throughput workload's time goes on CPU, by part, over the whole run (issue 14's profile of
``benchmarks/offline_throughput.py``: the same prompts, lengths and engine settings).

    python benchmarks/profile_offline.py --dtype bfloat16
    python benchmarks/profile_offline.py --dtype float32

Parts are timed as in ``profile_steps.py`` (wrapping the functions that make them; the CPU runs them synchronously),
with attention split into its calls (decode, prefill over paged context, fresh prefill, cache writes), steps split
into those that carry prefill work and pure decode steps, and the decode attention's KV read rate (bytes of K and V
its sequences hold / its time), the figure to hold against the machine's memory bandwidth. The baseline in the
same run is the run's own wall time: each part is printed as a share of it. Timing wrappers add a little to it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_throughput import workload  # noqa: E402  (the same prompts and output lengths)
from profile_steps import instrument  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    # offline_throughput.py's defaults, so that the two describe one workload
    args.min_input, args.max_input, args.min_output, args.max_output = 16, 512, 64, 256
    import torch

    from flotilla.engine import LLM, SamplingParams
    from flotilla.engine.model_loader import bundled_model_path, convert_gguf

    llm = LLM(str(convert_gguf(Path(bundled_model_path()))), dtype=args.dtype, max_model_len=args.max_input +
              args.max_output + 16, max_num_seqs=256, enable_prefix_caching=False, seed=args.seed,
              cpu_kvcache_space_gib=4)
    prompts, out_lens = workload(args, llm.get_tokenizer().vocab_size)
    engine = llm.llm_engine
    timers = instrument(engine)
    backend = engine.runner.backend
    for call in ("write_kv", "decode", "prefill_paged", "prefill_fresh"):
        timers.wrap(backend, call, f"attention: {call}")
    kv_read = defaultdict(float)
    decode = backend.decode

    def counted_decode(query, k_cache, v_cache, tables, seq_lens, scale):
        kv_read["bytes"] += int(seq_lens.sum()) * k_cache.shape[1] * k_cache.shape[3] * 2 * k_cache.element_size()
        return decode(query, k_cache, v_cache, tables, seq_lens, scale)

    backend.decode = counted_decode
    steps: dict[str, list[float]] = defaultdict(list)
    step = engine.step

    def classified_step():
        sched = engine.scheduler
        prefill = bool(sched.waiting) or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running)
        t = time.perf_counter()
        out = step()
        steps["steps with prefill" if prefill else "decode-only steps"].append(time.perf_counter() - t)
        return out

    engine.step = classified_step
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n) for n in out_lens]
    t = time.perf_counter()
    with timers.measuring():
        llm.generate([{"prompt_token_ids": q} for q in prompts], params, use_tqdm=False)
    total = time.perf_counter() - t
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, dtype {args.dtype}, attention {backend.name}")
    print(f"\n{sum(out_lens)} output tokens in {total:.1f} s = {sum(out_lens) / total:.1f} tok/s\n")
    print("| part | seconds | share |\n| --- | --- | --- |")
    for name, walls in steps.items():
        print(f"| {name} ({len(walls)}) | {sum(walls):.1f} | {sum(walls) / total:.0%} |")
    attention = sum(v for k, v in timers.seconds.items() if k.startswith("attention: "))
    timers.seconds["attention"] = attention
    for name, secs in sorted(timers.seconds.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {secs:.1f} | {secs / total:.0%} |")
    d = timers.seconds.get("attention: decode", 0.0)
    if d:
        print(f"\ndecode attention read {kv_read['bytes'] / 1e9:.1f} GB of K/V at {kv_read['bytes'] / d / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
