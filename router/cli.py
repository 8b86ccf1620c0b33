"""``flotilla router``: one OpenAI-compatible endpoint for many models and replicas.

    flotilla router --backend llama=http://10.0.0.5:8000,http://10.0.0.6:8000 --backend qwen=http://10.0.0.7:8000

In a cluster the operator runs it with ``--kubernetes`` instead: the table then comes from the InferenceServices
and their EndpointSlices.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flotilla.router.app import Router, RouterConfig
from flotilla.router.backends import Backends, StaticBackends


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RouterConfig()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--backend", action="append", default=[], metavar="NAME=URL[,URL...]",
                   help="a served model name and its replicas' base URLs (repeatable)")
    p.add_argument("--kubernetes", action="store_true",
                   help="route to the InferenceServices of the cluster (their EndpointSlices), and wake those "
                        "scaled to zero; in a pod, its service account's credentials, else the kubeconfig")
    p.add_argument("--namespace", default=None,
                   help="with --kubernetes: only this namespace's InferenceServices (default: every namespace)")
    p.add_argument("--refresh-interval", type=float, default=5.0,
                   help="with --kubernetes: seconds between reads of the cluster (0.5 while requests are held)")
    p.add_argument("--api-key", default=None, help="also read from FLOTILLA_API_KEY or VLLM_API_KEY; checked here "
                   "and passed on to the engines")
    p.add_argument("--prefix-chars", type=int, default=d.prefix_chars,
                   help="characters of the prompt that pick the replica (requests sharing them share a replica)")
    p.add_argument("--load-bound", type=float, default=d.load_bound,
                   help="no replica takes more than this times the mean in-flight load (>= 1)")
    p.add_argument("--load-floor", type=int, default=d.load_floor,
                   help="in-flight requests a replica may always take before the load bound applies")
    p.add_argument("--read-timeout", type=float, default=d.read_timeout,
                   help="seconds a replica may stay silent mid-request before the router gives up on it")
    p.add_argument("--hold-timeout", type=float, default=d.hold_timeout,
                   help="seconds a request waits for a model with no ready replica before a 503")
    p.add_argument("--max-held", type=int, default=d.max_held, help="requests held per model before a 503")
    p.add_argument("--scrape-interval", type=float, default=d.scrape_interval,
                   help="seconds between reads of the engines' KV-cache use")


def config_from(ns: argparse.Namespace) -> RouterConfig:
    if ns.load_bound < 1:
        raise ValueError(f"--load-bound {ns.load_bound}: must be at least 1")
    if (ns.prefix_chars < 1 or ns.load_floor < 1 or ns.max_held < 0 or ns.hold_timeout < 0
            or ns.scrape_interval <= 0 or ns.read_timeout <= 0):
        raise ValueError("--prefix-chars, --load-floor, --max-held, --hold-timeout, --read-timeout and "
                         "--scrape-interval must be positive")
    key = ns.api_key or os.environ.get("FLOTILLA_API_KEY") or os.environ.get("VLLM_API_KEY") or None
    return RouterConfig(api_key=key, prefix_chars=ns.prefix_chars, load_bound=ns.load_bound,
                        hold_timeout=ns.hold_timeout, max_held=ns.max_held, scrape_interval=ns.scrape_interval,
                        load_floor=ns.load_floor, read_timeout=ns.read_timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flotilla router", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backends: Backends
    try:
        config = config_from(ns)
        if ns.kubernetes == bool(ns.backend):
            raise ValueError("give --backend NAME=URL[,URL...] (a fixed fleet) or --kubernetes (the cluster's), "
                             "one of the two")
        if ns.kubernetes:
            from flotilla.router.kubernetes import KubernetesBackends

            backends = KubernetesBackends(ns.namespace, ns.refresh_interval)
        else:
            backends = StaticBackends.parse(ns.backend)
    except ValueError as e:
        print(f"flotilla router: {e}", file=sys.stderr)
        return 2
    from aiohttp import web

    web.run_app(Router(backends, config).build_app(), host=ns.host, port=ns.port, print=None,
                access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
