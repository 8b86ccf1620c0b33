"""How much memory the engine may use on a CPU host: the container's cgroup limit, not the machine's RAM.

A pod with `limits.memory: 3Gi` on a 24 GiB node sees 24 GiB in /proc/meminfo; a KV cache sized from that
(or vLLM's fixed 4 GiB default) gets the engine OOM-killed at start, in a crash loop. `cpu_kv_cache_bytes`
is pure; the readers take the cgroup root as an argument so tests can point them at a folder.
"""
from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_CPU_KV_CACHE_BYTES = 4 * 2**30  # vLLM's VLLM_CPU_KVCACHE_SPACE default
_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a page-rounded 2^63-1


def memory_limit_bytes(root: Path = CGROUP_ROOT) -> int | None:
    """This process's memory limit from cgroup v2 (`memory.max`) or v1 (`memory/memory.limit_in_bytes`),
    None when unlimited or unknown (no cgroup filesystem)."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        value = int(text)
        return value if value < _UNLIMITED else None
    return None


def rss_bytes() -> int:
    """Resident memory of this process now (weights loaded, allocator warm)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (``/proc/self/clear_refs`` value 5 resets the kernel's ``VmHWM``). Where that
    file cannot be written, the peak since the process started stands: larger, so on the safe side."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """The largest resident memory of this process since start or ``reset_peak_rss`` (``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return rss_bytes()


def cpu_kv_cache_bytes(configured: int | None, limit: int | None, used: int, utilization: float) -> int:
    """Bytes for the KV cache on CPU. A `configured` space (VLLM_CPU_KVCACHE_SPACE) is the user's word and kept
    as given. Otherwise 4 GiB (vLLM's default), shrunk under a memory limit to what is left of
    `limit × utilization` once the process uses `used`. Raises ValueError when the limit leaves nothing."""
    if configured is not None:
        return configured
    if limit is None:
        return DEFAULT_CPU_KV_CACHE_BYTES
    room = int(limit * utilization) - used
    if room <= 0:
        raise ValueError(
            f"no memory left for the KV cache: the container's limit is {limit / 2**30:.2f} GiB and the engine "
            f"already uses {used / 2**30:.2f} GiB (x{utilization:g} gpu_memory_utilization); raise the memory "
            "limit, or set VLLM_CPU_KVCACHE_SPACE")
    return min(DEFAULT_CPU_KV_CACHE_BYTES, room)
