"""KV block pool and scheduler bookkeeping, with no model at all."""

from __future__ import annotations

import pytest

from flotilla.engine.block_manager import BlockManager
from flotilla.engine.config import SchedulerConfig
from flotilla.engine.outputs import RequestMetrics
from flotilla.engine.request import Request, RequestStatus
from flotilla.engine.sampling_params import SamplingParams
from flotilla.engine.scheduler import Scheduler


def _req(rid: str, tokens: list[int], max_tokens: int = 8, salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens), RequestMetrics(0.0), 4096, salt)


def _computed(bm: BlockManager, rid: str, tokens: list[int], salt: str | None = None) -> Request:
    """A request whose whole prompt has been computed and its full blocks named, as after a prefill step."""
    r = _req(rid, tokens, salt=salt)
    assert bm.allocate(r, len(tokens))
    r.num_computed_tokens = len(tokens)
    bm.cache_full_blocks(r)
    return r


def test_allocation_grows_on_demand_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    r = _req("a", list(range(10)))
    assert bm.allocate(r, 10)
    assert len(r.block_ids) == 3 and bm.num_free_blocks == 5
    r.num_computed_tokens = 10
    r.append_token(99)
    r.append_token(98)
    assert bm.allocate(r, 1) and len(r.block_ids) == 3  # token 11 still fits block 3
    r.num_computed_tokens = 11
    assert bm.allocate(r, 1) and len(r.block_ids) == 3
    r.num_computed_tokens = 12
    r.append_token(97)
    assert bm.allocate(r, 1) and len(r.block_ids) == 4  # token 13 opens a fourth block
    bm.free(r)
    assert bm.num_free_blocks == 8 and r.block_ids == []
    bm.check_integrity()


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    a, b = _req("a", list(range(8))), _req("b", list(range(8)))
    assert bm.allocate(a, 8)
    assert not bm.allocate(b, 8)
    assert b.block_ids == [] and bm.num_free_blocks == 1


def test_double_free_is_detected():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = _req("a", [1, 2, 3])
    bm.allocate(a, 3)
    ids = list(a.block_ids)
    bm.free(a)
    a.block_ids = ids
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(a)


def test_shared_prefix_reuses_blocks_with_reference_counts():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = _computed(bm, "a", list(range(13)))  # three full blocks are now named
    b = _req("b", list(range(12)) + [500, 501])
    hits = bm.match_prefix(b)
    assert hits == a.block_ids[:3]
    assert bm.allocate(b, 2, hits)
    assert b.num_computed_tokens == 12 and b.block_ids[:3] == a.block_ids[:3]
    assert all(bm.blocks[i].ref_count == 2 for i in a.block_ids[:3])
    bm.free(a)
    assert all(bm.blocks[i].ref_count == 1 for i in b.block_ids[:3])
    bm.free(b)
    assert bm.num_free_blocks == 10
    bm.check_integrity()


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = _computed(bm, "a", list(range(8)))
    bm.free(a)
    b = _req("b", list(range(8)))
    assert len(bm.match_prefix(b)) == 1  # only the first block: the last token must run for logits


def test_freed_cached_blocks_are_reused_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _computed(bm, "a", list(range(9)))
    bm.free(a)
    assert bm.num_free_blocks == 4
    assert len(bm.match_prefix(_req("x", list(range(9))))) == 2  # still cached while free
    # A request needing all four blocks evicts them.
    c = _req("c", [7] * 16)
    assert bm.allocate(c, 16)
    assert bm.match_prefix(_req("y", list(range(9)))) == []
    bm.free(c)
    bm.check_integrity()


def test_cache_salt_isolates_tenants():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _computed(bm, "a", list(range(9)), salt="tenant-a")
    assert bm.match_prefix(_req("b", list(range(9)), salt="tenant-b")) == []
    assert bm.match_prefix(_req("c", list(range(9)))) == []
    assert len(bm.match_prefix(_req("d", list(range(9)), salt="tenant-a"))) == 2


def _scheduler(num_blocks=8, block_size=4, budget=64, max_seqs=8, chunked=True, caching=False):
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_seqs, budget, 4096, chunked), bm), bm


def _run_step(sched: Scheduler) -> dict[str, int]:
    """Pretend the model ran: advance computed tokens and append a token where a sample was due."""
    out = sched.schedule()
    for s in out.scheduled:
        due = s.completes_prompt
        s.request.num_computed_tokens += s.num_new_tokens
        if due:
            s.request.append_token(1)
    return {s.request.request_id: s.num_new_tokens for s in out.scheduled}


def test_decodes_go_first_and_prefill_is_chunked_to_the_budget():
    sched, _ = _scheduler(num_blocks=32, budget=10)
    a = _req("a", list(range(4)))
    sched.add(a)
    assert _run_step(sched) == {"a": 4}
    sched.add(_req("b", list(range(25))))
    assert _run_step(sched) == {"a": 1, "b": 9}
    assert _run_step(sched) == {"a": 1, "b": 9}
    assert _run_step(sched) == {"a": 1, "b": 7}
    assert _run_step(sched) == {"a": 1, "b": 1}


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched, _ = _scheduler(num_blocks=32, budget=10, chunked=False)
    sched.add(_req("a", list(range(4))))
    sched.add(_req("b", list(range(8))))
    assert _run_step(sched) == {"a": 4}  # b (8 tokens) does not fit beside a in 10 - 4
    assert _run_step(sched) == {"a": 1, "b": 8}


def test_max_num_seqs_caps_the_running_batch():
    sched, _ = _scheduler(num_blocks=32, max_seqs=2)
    for i in range(3):
        sched.add(_req(str(i), [1, 2]))
    assert set(_run_step(sched)) == {"0", "1"}
    assert len(sched.waiting) == 1


def test_out_of_blocks_preempts_the_newest_request_by_recompute():
    sched, bm = _scheduler(num_blocks=4, block_size=4, budget=64)
    old, new = _req("old", list(range(7))), _req("new", list(range(7)))
    sched.add(old)
    sched.add(new)
    _run_step(sched)  # both prefilled: 2 blocks each, pool full
    assert bm.num_free_blocks == 0
    assert _run_step(sched) == {"old": 1, "new": 1}  # token 8 still fits each second block
    steps = _run_step(sched)  # old needs a third block for token 9: the newest request is evicted
    assert steps == {"old": 1}
    assert new.status == RequestStatus.WAITING and new.num_computed_tokens == 0 and new.block_ids == []
    assert new.output_token_ids == [1, 1]  # generated tokens survive; they are recomputed on resume
    assert sched.waiting[0] is new and sched.num_preemptions == 1
    sched.finish(old, RequestStatus.FINISHED_STOPPED)
    assert _run_step(sched) == {"new": 9}  # prompt + its two output tokens, recomputed
    sched.finish(new, RequestStatus.FINISHED_ABORTED)
    assert bm.num_free_blocks == 4
    bm.check_integrity()
