"""The ``flotilla`` command: ``flotilla router ...`` runs the router (no torch needed, so it works in the
operator's image); every other command (``serve``, ``download``) is the engine's."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["router"]:
        from flotilla.router.cli import main as router_main

        return router_main(args[1:])
    if args[:1] in ([], ["-h"], ["--help"]):
        print("flotilla router ...: one OpenAI-compatible endpoint for many models and replicas "
              "(flotilla router --help)")
    from flotilla.engine.cli import main as engine_main

    return engine_main(args)


if __name__ == "__main__":
    sys.exit(main())
