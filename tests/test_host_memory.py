"""The CPU KV cache fits the container's memory limit (a pod's limits.memory), read from cgroup v1 or v2."""
from __future__ import annotations

import pytest

from flotilla.engine.host_memory import cpu_kv_cache_bytes, memory_limit_bytes, rss_bytes

GiB = 2**30


def test_cgroup_v2_limit_and_unlimited(tmp_path):
    (tmp_path / "memory.max").write_text("3221225472\n")
    assert memory_limit_bytes(tmp_path) == 3 * GiB
    (tmp_path / "memory.max").write_text("max\n")
    assert memory_limit_bytes(tmp_path) is None


def test_cgroup_v1_limit_and_unlimited(tmp_path):
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("2147483648\n")
    assert memory_limit_bytes(tmp_path) == 2 * GiB
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory_limit_bytes(tmp_path) is None


def test_no_cgroup_filesystem_means_no_limit(tmp_path):
    assert memory_limit_bytes(tmp_path) is None


def test_default_space_shrinks_to_what_the_limit_leaves():
    # 3 GiB limit x 0.9, 1 GiB used: 1.7 GiB left, below the 4 GiB default
    assert cpu_kv_cache_bytes(None, 3 * GiB, 1 * GiB, 0.9) == int(3 * GiB * 0.9) - GiB
    # a roomy limit keeps the default
    assert cpu_kv_cache_bytes(None, 64 * GiB, 1 * GiB, 0.9) == 4 * GiB
    assert cpu_kv_cache_bytes(None, None, 1 * GiB, 0.9) == 4 * GiB


def test_an_explicit_space_is_kept_and_a_full_container_is_refused():
    assert cpu_kv_cache_bytes(8 * GiB, 3 * GiB, 1 * GiB, 0.9) == 8 * GiB
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        cpu_kv_cache_bytes(None, 1 * GiB, 1 * GiB, 0.9)


def test_rss_is_this_process():
    # statm (pages) read against status's VmRSS (kB), the kernel's own figure, at the same moment. Not asserted:
    # that a fresh 64 MiB shows up at once; CI twice read the same RSS to the byte before and after writing 64 MiB
    # (the kernel's RSS counters are per-CPU and folded lazily), while this machine always showed the 64 MiB.
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    vm_rss, vm_size = (int(status[k].split()[0]) * 1024 for k in ("VmRSS", "VmSize"))
    assert abs(rss_bytes() - vm_rss) < 16 * 2**20
    assert 0 < rss_bytes() < vm_size
