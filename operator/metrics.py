"""The operator's own Prometheus metrics (served on --metrics-port), separate from the engines'."""
from __future__ import annotations

from prometheus_client import Counter, Gauge

RECONCILES = Counter("flotilla_operator_reconciles_total", "Reconciliations of InferenceServices.",
                     ["result"])
SCALE_EVENTS = Counter("flotilla_operator_scale_events_total", "Replica changes made by the builtin autoscaler.",
                       ["direction"])
SCRAPE_FAILURES = Counter("flotilla_operator_engine_scrape_failures_total",
                          "Engine /metrics scrapes that failed (unreachable, error, unparseable).")
DESIRED_REPLICAS = Gauge("flotilla_operator_desired_replicas", "Replicas the operator wants per service.",
                         ["namespace", "name"])
KV_CACHE_UTILIZATION = Gauge("flotilla_operator_fleet_kv_cache_utilization",
                             "Average KV-cache utilisation of a service's ready engines, as last scraped.",
                             ["namespace", "name"])
