"""Operator-wide settings, read once from the environment of the operator's own Deployment."""
from __future__ import annotations

import os
from dataclasses import dataclass

from flotilla.operator.spec import default_engine_image


@dataclass(frozen=True)
class OperatorSettings:
    #: Engine image for services that do not name one (FLOTILLA_ENGINE_IMAGE).
    engine_image: str
    #: Prometheus that KEDA ScaledObjects query unless a service names its own.
    prometheus_address: str = "http://prometheus-operated.monitoring.svc:9090"
    #: How often the builtin autoscaler scrapes each fleet, and how long one scrape may take.
    scrape_interval_seconds: float = 15.0
    scrape_timeout_seconds: float = 3.0

    @classmethod
    def from_environment(cls) -> "OperatorSettings":
        env = os.environ
        return cls(
            engine_image=default_engine_image(),
            prometheus_address=env.get("FLOTILLA_PROMETHEUS_ADDRESS", cls.prometheus_address),
            scrape_interval_seconds=float(env.get("FLOTILLA_SCRAPE_INTERVAL_SECONDS", cls.scrape_interval_seconds)),
            scrape_timeout_seconds=float(env.get("FLOTILLA_SCRAPE_TIMEOUT_SECONDS", cls.scrape_timeout_seconds)),
        )
