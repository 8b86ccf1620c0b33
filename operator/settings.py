"""Operator-wide settings, read once from the environment of the operator's own Deployment."""
from __future__ import annotations

import os
from dataclasses import dataclass

from flotilla.operator.spec import SpecError, default_engine_image

DEFAULT_ROUTER_IMAGE = "ghcr.io/flotilla-dev/flotilla-operator:0.1.0"  # the router runs from the operator's image
ROUTER_MODES = ("namespace", "cluster", "off")


@dataclass(frozen=True)
class OperatorSettings:
    #: Engine image for services that do not name one (FLOTILLA_ENGINE_IMAGE).
    engine_image: str
    #: Prometheus that KEDA ScaledObjects query unless a service names its own.
    prometheus_address: str = "http://prometheus-operated.monitoring.svc:9090"
    #: How often the builtin autoscaler scrapes each fleet, and how long one scrape may take.
    scrape_interval_seconds: float = 15.0
    scrape_timeout_seconds: float = 3.0
    #: Where the router runs (FLOTILLA_ROUTER): one per namespace that has InferenceServices (rendered by the
    #: operator), one for the cluster (manifests/router/, at FLOTILLA_ROUTER_URL), or none.
    router_mode: str = "namespace"
    router_image: str = DEFAULT_ROUTER_IMAGE
    router_url: str | None = None

    @classmethod
    def from_environment(cls) -> "OperatorSettings":
        env = os.environ
        return cls(
            engine_image=default_engine_image(),
            prometheus_address=env.get("FLOTILLA_PROMETHEUS_ADDRESS", cls.prometheus_address),
            scrape_interval_seconds=float(env.get("FLOTILLA_SCRAPE_INTERVAL_SECONDS", cls.scrape_interval_seconds)),
            scrape_timeout_seconds=float(env.get("FLOTILLA_SCRAPE_TIMEOUT_SECONDS", cls.scrape_timeout_seconds)),
            router_mode=_router_mode(env.get("FLOTILLA_ROUTER", cls.router_mode)),
            router_image=env.get("FLOTILLA_ROUTER_IMAGE") or DEFAULT_ROUTER_IMAGE,
            router_url=env.get("FLOTILLA_ROUTER_URL") or None,
        )


def _router_mode(value: str) -> str:
    if value not in ROUTER_MODES:
        raise SpecError(f"FLOTILLA_ROUTER={value!r}: expected one of {', '.join(ROUTER_MODES)}")
    return value
