"""The replica choice for one request, from what the router knows about each replica: its in-flight requests
(counted here), its KV-cache use (scraped from the engines' ``/metrics`` by the operator's own
``autoscaler.scrape``), and whether it just failed.

A request with a prompt goes where its prefix hashes (``chwbl``), within the load bound. One without (nothing to
be cached) goes to the replica with the least KV-cache use, then the fewest in flight. A replica that refused a
connection is left out for ``eject_seconds``; when every replica is out, they are all tried again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from flotilla.router import chwbl


@dataclass
class Choice:
    replica: str
    reason: str  # "affinity" (the prefix's own replica), "spill" (the next one, over the bound), "least_kv"


@dataclass
class Balancer:
    bound: float = 1.25
    floor: int = 1
    eject_seconds: float = 10.0
    clock: Callable[[], float] = time.monotonic
    in_flight: dict[str, int] = field(default_factory=dict)
    kv_usage: dict[str, float] = field(default_factory=dict)
    _ejected: dict[str, float] = field(default_factory=dict)  # replica -> until
    _rings: dict[tuple[str, ...], chwbl.Ring] = field(default_factory=dict)

    def _ring(self, replicas: tuple[str, ...]) -> chwbl.Ring:
        key = tuple(sorted(replicas))
        if key not in self._rings:
            if len(self._rings) > 256:  # replica sets come and go; keep the cache small
                self._rings.clear()
            self._rings[key] = chwbl.build_ring(key)
        return self._rings[key]

    def ejected(self, replicas: tuple[str, ...]) -> frozenset[str]:
        now = self.clock()
        out = frozenset(r for r in replicas if self._ejected.get(r, 0.0) > now)
        return frozenset() if out == frozenset(replicas) else out

    def choose(self, replicas: tuple[str, ...], key: str, tried: frozenset[str] = frozenset()) -> Choice | None:
        """A replica for a request with routing ``key`` (a prompt prefix, or ""), not one in ``tried``."""
        exclude = self.ejected(replicas) | tried
        if key:
            picked = chwbl.choose(self._ring(replicas), key, self.in_flight, self.bound, exclude, self.floor)
            if picked is None:
                return None
            return Choice(picked[0], "affinity" if picked[1] else "spill")
        left = [r for r in replicas if r not in exclude]
        if not left:
            return None
        return Choice(min(left, key=lambda r: (self.kv_usage.get(r, 0.0), self.in_flight.get(r, 0), r)), "least_kv")

    def started(self, replica: str) -> None:
        self.in_flight[replica] = self.in_flight.get(replica, 0) + 1

    def finished(self, replica: str) -> None:
        self.in_flight[replica] = max(0, self.in_flight.get(replica, 0) - 1)

    def failed(self, replica: str) -> None:
        self._ejected[replica] = self.clock() + self.eject_seconds

    def healthy(self, replica: str) -> None:
        self._ejected.pop(replica, None)

