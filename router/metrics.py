"""What the router exports on ``/metrics`` (its own registry: several routers may share a test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.routed = Counter("flotilla_router_routed_requests", "Requests sent to a replica, by why it was chosen "
                              "(affinity: the prompt prefix's own replica; spill: the next one, the first being "
                              "over the load bound; least_kv: no prefix, least KV-cache use).",
                              ["model", "replica", "reason"], registry=r)
        self.responses = Counter("flotilla_router_responses", "Responses by status code.", ["model", "code"],
                                 registry=r)
        self.in_flight = Gauge("flotilla_router_in_flight_requests", "Requests in flight per replica.",
                               ["replica"], registry=r)
        self.replica_failures = Counter("flotilla_router_replica_failures",
                                        "Connections a replica refused or dropped before answering.", ["replica"],
                                        registry=r)
        self.queue_length = Gauge("flotilla_router_held_requests",
                                  "Requests held for a model with no ready replica (scaled to zero, starting).",
                                  ["model"], registry=r)
        self.hold_seconds = Histogram("flotilla_router_hold_seconds",
                                      "How long requests were held before a replica took them.", ["model"],
                                      buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=r)
        self.rejected = Counter("flotilla_router_rejected_requests",
                                "Held requests answered 503 (reason: timeout, queue_full, wake_failed).", ["model", "reason"],
                                registry=r)
