"""`python -m flotilla.operator`: run the operator (kopf) in one namespace or all of them.

Several replicas may run at once: kopf peering elects one active instance (the others stand by),
so a Deployment with 2 replicas gives failover without double reconciliation.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flotilla.operator",
                                description="Flotilla operator: InferenceService -> engine fleet.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[],
                       help="watch only this namespace (repeatable); default: all namespaces")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    p.add_argument("--peering", default="flotilla",
                   help="kopf peering name; replicas with the same name elect one active operator")
    p.add_argument("--standalone", action="store_true", help="no peering (one replica only, or local runs)")
    # kopf pauses *every* peer when two share a priority, so equal priorities mean no replica acts;
    # a random one per process makes the highest active and the others stand by until it goes.
    p.add_argument("--priority", type=int, default=None,
                   help="kopf peering priority (highest live replica acts); default: random per process")
    p.add_argument("--liveness-port", type=int, default=8080, help="serves /healthz for the liveness probe")
    p.add_argument("--metrics-port", type=int, default=9090, help="serves the operator's own /metrics")
    p.add_argument("--verbose", "-v", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported here so that --help works without a cluster or kopf's import-time cost.
    import kopf
    from prometheus_client import start_http_server

    from flotilla.operator import handlers  # noqa: F401  (registers the handlers)

    start_http_server(args.metrics_port)
    clusterwide = not args.namespace
    kopf.run(
        clusterwide=clusterwide,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=args.priority if args.priority is not None else random.SystemRandom().randint(1, 2**31 - 1),
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz",
        memo=kopf.Memo(namespaces=tuple(args.namespace)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
