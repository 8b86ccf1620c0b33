"""Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2016), as pure functions.

Every replica owns ``vnodes`` points on a 64-bit ring. A key goes to the first replica clockwise from its hash
whose in-flight load, with this request, stays within ``ceil(bound * (total + 1) / n)``: the same key keeps
landing on the same replica (its prefix stays cached there) until that replica carries more than ``bound`` times
the mean (and more than a small floor), and then it spills to the next replica on the ring, the same next one for every key that hashed there,
so a hot prefix spreads over few replicas rather than all. Adding or removing one replica moves only the keys
it owned (about 1/n of them).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass
from typing import Mapping, Sequence


def hash64(text: str) -> int:
    """A stable 64-bit hash (Python's ``hash`` of a str changes per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Ring:
    points: tuple[int, ...]  # sorted hash points
    owners: tuple[str, ...]  # the replica owning each point

    @property
    def replicas(self) -> frozenset[str]:
        return frozenset(self.owners)


def build_ring(replicas: Sequence[str], vnodes: int = 160) -> Ring:
    pairs = sorted((hash64(f"{replica}#{i}"), replica) for replica in set(replicas) for i in range(vnodes))
    return Ring(tuple(p for p, _ in pairs), tuple(r for _, r in pairs))


def capacity(total_load: int, replicas: int, bound: float, floor: int = 1) -> int:
    """The most in-flight requests one replica may hold once this request is placed: ``bound`` times the mean, and
    never fewer than ``floor`` (an engine batches a few more requests nearly for free, while a spill to a replica
    without the prefix costs a whole cold prefill)."""
    return max(floor, math.ceil(bound * (total_load + 1) / replicas))


def walk(ring: Ring, key: str) -> list[str]:
    """Every replica once, in ring order from the key's hash: the key's preference list."""
    if not ring.points:
        return []
    start = bisect.bisect_left(ring.points, hash64(key))
    order: list[str] = []
    seen: set[str] = set()
    n = len(ring.points)
    for i in range(n):
        owner = ring.owners[(start + i) % n]
        if owner not in seen:
            seen.add(owner)
            order.append(owner)
            if len(seen) == len(ring.replicas):
                break
    return order


def choose(ring: Ring, key: str, loads: Mapping[str, int], bound: float = 1.25,
           exclude: frozenset[str] = frozenset(), floor: int = 1) -> tuple[str, bool] | None:
    """(replica, whether it is the key's first choice) for ``key``, or None when no replica is left.
    ``loads`` are in-flight requests per replica; replicas in ``exclude`` (failing ones) are skipped."""
    order = [r for r in walk(ring, key) if r not in exclude]
    if not order:
        return None
    limit = capacity(sum(loads.get(r, 0) for r in order), len(order), bound, floor)
    for i, replica in enumerate(order):
        if loads.get(replica, 0) + 1 <= limit:
            return replica, i == 0
    return order[0], True  # unreachable with bound >= 1 (some replica is at or below the mean); kept total
