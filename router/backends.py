"""Which replicas serve which model, and how a model with none is woken.

``Backends`` keeps the table (served model name -> replica base URLs) and lets the proxy wait, without polling,
until a model has a replica. Where the table comes from is the subclass's business: ``StaticBackends`` takes it
from the command line (a fixed fleet, or one outside Kubernetes); the Kubernetes discovery fills it from
InferenceServices and their EndpointSlices and wakes a service by asking the operator for a replica.
"""

from __future__ import annotations

import asyncio
from typing import Iterable, Mapping


class Backends:
    def __init__(self, table: Mapping[str, Iterable[str]] | None = None) -> None:
        self._table: dict[str, tuple[str, ...]] = {}
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        for model, urls in (table or {}).items():
            self._table[model] = tuple(u.rstrip("/") for u in urls)

    def models(self) -> list[str]:
        return sorted(self._table)

    def replicas(self, model: str) -> tuple[str, ...] | None:
        """The model's ready replicas (base URLs); ``()`` while it has none (scaled to zero, starting), None for a
        model nothing serves."""
        return self._table.get(model)

    def set_replicas(self, model: str, urls: Iterable[str] | None) -> None:
        """Replace a model's replicas (None: the model is gone). Safe to call from any thread."""
        def apply() -> None:
            if urls is None:
                self._table.pop(model, None)
            else:
                self._table[model] = tuple(u.rstrip("/") for u in urls)
            self._changed.set()
            self._changed = asyncio.Event()

        if self._loop is not None and self._loop.is_running():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not self._loop:
                self._loop.call_soon_threadsafe(apply)
                return
        apply()

    async def start(self) -> None:
        """Called once in the router's event loop before it serves."""
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        pass

    async def wake(self, model: str) -> None:
        """Ask for a replica of ``model``, which has none. A fixed fleet cannot: its requests wait for the hold
        timeout (a replica may come back) and then get a 503."""

    async def wait_for_replicas(self, model: str, timeout: float) -> tuple[str, ...]:
        """The model's replicas once it has some; ``()`` if ``timeout`` passes first (or the model goes away)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (found := self.replicas(model)):
            if found is None:
                return ()
            left = deadline - loop.time()
            if left <= 0:
                return ()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                return ()
        return found


class StaticBackends(Backends):
    """``--backend NAME=URL[,URL...]``, repeatable: a fixed table."""

    @classmethod
    def parse(cls, specs: Iterable[str]) -> "StaticBackends":
        table: dict[str, list[str]] = {}
        for spec in specs:
            name, sep, urls = spec.partition("=")
            if not sep or not name or not urls:
                raise ValueError(f"--backend {spec!r}: expected NAME=URL[,URL...]")
            for url in urls.split(","):
                if not url.startswith(("http://", "https://")):
                    raise ValueError(f"--backend {spec!r}: {url!r} is not an http(s) URL")
                table.setdefault(name, []).append(url)
        return cls(table)
