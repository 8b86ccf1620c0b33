"""The router's HTTP side (aiohttp): OpenAI's API in front of every replica of every model.

A request is checked once here (the API key, the JSON, the ``model``), then sent to one replica and its response,
streamed or not, passed through as it comes. A replica that refuses the connection (or answers 503, draining) is
left for the next choice, so a dead or departing pod costs a retry, not an error. A model with no ready replica
holds its requests in a bounded queue while the backends wake it; they go on as soon as a replica is ready, or get
a 503 with Retry-After when the hold times out or the queue is full.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest

from flotilla.router.backends import Backends
from flotilla.operator.autoscaler import scrape
from flotilla.router.balancer import Balancer
from flotilla.router.metrics import RouterMetrics
from flotilla.router.prefix import prefix_key

logger = logging.getLogger("flotilla.router")

ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
_FORWARD_HEADERS = ("authorization", "content-type", "accept", "x-request-id", "user-agent")
_RETURN_HEADERS = ("content-type", "x-request-id", "retry-after")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                503: "service_unavailable_error"}


@dataclass(frozen=True)
class RouterConfig:
    api_key: str | None = None
    prefix_chars: int = 256  # how much of the prompt the routing key is
    load_bound: float = 1.25  # no replica above this times the mean in-flight load ...
    load_floor: int = 4  # ... once it holds more than this many (a few more batch nearly free; a spill is a cold prefill)
    hold_timeout: float = 600.0  # seconds a request waits for a model scaled to zero
    wake_interval: float = 10.0  # while requests are held, the replica is asked for again this often
    max_held: int = 256  # held requests per model before a 503
    retry_after: int = 30  # the Retry-After of a 503
    scrape_interval: float = 5.0  # seconds between reads of the engines' /metrics
    connect_timeout: float = 5.0
    read_timeout: float = 600.0  # seconds a replica may stay silent mid-request before the router gives up on it
    eject_seconds: float = 10.0  # a replica that refused a connection is left out this long


def error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    """OpenAI's error shape, as the engine writes it."""
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "api_error"), "param": param,
                      "code": status}}
    return web.json_response(body, status=status, headers=headers)


class Router:
    def __init__(self, backends: Backends, config: RouterConfig) -> None:
        self.backends = backends
        self.config = config
        self.balancer = Balancer(bound=config.load_bound, floor=config.load_floor,
                                 eject_seconds=config.eject_seconds)
        self.metrics = RouterMetrics()
        self.held: dict[str, int] = {}
        self.session: aiohttp.ClientSession | None = None
        self._scraper: asyncio.Task | None = None
        self._waking: dict[str, asyncio.Task] = {}
        self.started = int(time.time())

    # ---- lifecycle ----------------------------------------------------------------------------------------

    async def on_startup(self, _: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout,
                                        sock_read=self.config.read_timeout)
        self.session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        await self.backends.start()
        self._scraper = asyncio.create_task(self._scrape_forever())

    async def on_cleanup(self, _: web.Application) -> None:
        if self._scraper is not None:
            self._scraper.cancel()
        await self.backends.stop()
        if self.session is not None:
            await self.session.close()

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20, middlewares=[self._auth])
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        for path in ROUTED_PATHS:
            app.router.add_post(path, self._route)
        return app

    # ---- handlers -----------------------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        key = self.config.api_key
        if key and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return error(401, "invalid or missing API key (Authorization: Bearer ...)")
        return await handler(request)

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain")

    async def _models(self, _: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": self.started, "owned_by": "flotilla",
                 "ready_replicas": len(self.backends.replicas(m) or ())} for m in self.backends.models()]
        return web.json_response({"object": "list", "data": data})

    async def _route(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return error(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object")
        model = body.get("model")
        if model is None and len(self.backends.models()) == 1:
            model = self.backends.models()[0]
        if not isinstance(model, str):
            return error(400, "model: required (one of /v1/models)", "model")
        if self.backends.replicas(model) is None:
            return error(404, f"The model `{model}` does not exist.", "model")
        response = await self._forward(request, model, raw, prefix_key(body, self.config.prefix_chars))
        self.metrics.responses.labels(model, str(response.status)).inc()
        return response

    # ---- forwarding ---------------------------------------------------------------------------------------

    async def _hold(self, model: str) -> tuple[str, ...] | web.Response:
        """Wait for a replica of ``model`` (asking for one), or the 503 that ends the wait."""
        retry = {"Retry-After": str(self.config.retry_after)}
        if self.held.get(model, 0) >= self.config.max_held:
            self.metrics.rejected.labels(model, "queue_full").inc()
            return error(503, f"{model}: too many requests are waiting for a replica; retry later", headers=retry)
        self.held[model] = self.held.get(model, 0) + 1
        self.metrics.queue_length.labels(model).set(self.held[model])
        loop = asyncio.get_running_loop()
        start, deadline = time.monotonic(), loop.time() + self.config.hold_timeout
        replicas: tuple[str, ...] = ()
        try:
            # Ask, wait, and ask again every wake_interval while nothing is ready: an ask can be undone (a scale
            # to zero decided a moment before it landed) and must not leave the held requests waiting for nothing.
            while not replicas:
                left = deadline - loop.time()
                if left <= 0 or self.backends.replicas(model) is None:
                    break
                waking = self._wake(model)
                waiting = asyncio.ensure_future(
                    self.backends.wait_for_replicas(model, min(left, self.config.wake_interval)))
                try:
                    await asyncio.wait({waiting, waking}, return_when=asyncio.FIRST_COMPLETED)
                    if not waiting.done() and not waking.cancelled() and waking.exception() is not None:
                        # the ask failed (RBAC, the service gone): waiting longer would end in the same 503
                        self.metrics.rejected.labels(model, "wake_failed").inc()
                        return error(503, f"{model}: could not ask for a replica: {waking.exception()}",
                                     headers=retry)
                    replicas = await waiting
                finally:
                    waiting.cancel()
        finally:
            self.held[model] -= 1
            self.metrics.queue_length.labels(model).set(self.held[model])
        if self.backends.replicas(model) is None:
            return error(404, f"The model `{model}` does not exist.", "model")
        if not replicas:
            self.metrics.rejected.labels(model, "timeout").inc()
            return error(503, f"{model}: no replica became ready within {self.config.hold_timeout:g}s; retry later",
                         headers=retry)
        self.metrics.hold_seconds.labels(model).observe(time.monotonic() - start)
        return replicas

    def _wake(self, model: str) -> asyncio.Task:
        """The ask to the backends for a replica of ``model``: one while an ask is under way (its outcome is shared
        by every request held meanwhile), a new one after it ended."""
        if (task := self._waking.get(model)) is not None and not task.done():
            return task

        def done(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is not None:
                logger.warning("waking %s failed: %s", model, t.exception())

        self._waking[model] = task = asyncio.create_task(self.backends.wake(model))
        task.add_done_callback(done)
        return task

    async def _forward(self, request: web.Request, model: str, raw: bytes, key: str) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_HEADERS}
        tried: set[str] = set()
        while True:
            replicas = self.backends.replicas(model)
            if replicas == ():
                held = await self._hold(model)
                if isinstance(held, web.Response):
                    return held
                replicas = held
            if replicas is None:
                return error(404, f"The model `{model}` does not exist.", "model")
            choice = self.balancer.choose(replicas, key, frozenset(tried))
            if choice is None:
                return error(503, f"{model}: no replica answered; retry later",
                             headers={"Retry-After": str(self.config.retry_after)})
            replica = choice.replica
            self.metrics.routed.labels(model, replica, choice.reason).inc()
            self.balancer.started(replica)
            self.metrics.in_flight.labels(replica).set(self.balancer.in_flight[replica])
            try:
                passed = await self._pass_through(request, replica, raw, headers, last=len(tried) + 1 >= len(replicas))
            finally:
                self.balancer.finished(replica)
                self.metrics.in_flight.labels(replica).set(self.balancer.in_flight[replica])
            if passed is not None:
                return passed
            tried.add(replica)

    async def _pass_through(self, request: web.Request, replica: str, raw: bytes, headers: dict[str, str],
                            last: bool) -> web.StreamResponse | None:
        """The replica's response, streamed to the client; None when the replica could not take the request
        (refused, dropped before answering, or draining with a 503 while another replica is left)."""
        assert self.session is not None
        try:
            upstream_cm = self.session.post(replica + request.path, data=raw, headers=headers)
            upstream = await upstream_cm.__aenter__()
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
            logger.warning("replica %s failed before answering: %s", replica, e)
            self.balancer.failed(replica)
            self.metrics.replica_failures.labels(replica).inc()
            return None
        try:
            self.balancer.healthy(replica)
            if upstream.status == 503 and not last:
                return None  # draining (a rolling update, a scale-down): another replica takes it
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() in _RETURN_HEADERS})
            await response.prepare(request)
            while True:
                try:
                    chunk = await upstream.content.readany()
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    # the replica died mid-response: nothing can be taken back, the client sees the cut
                    logger.warning("replica %s broke off a response: %s", replica, e)
                    self.balancer.failed(replica)
                    self.metrics.replica_failures.labels(replica).inc()
                    break
                if not chunk:
                    await response.write_eof()
                    break
                try:
                    await response.write(chunk)
                except ConnectionResetError:  # the client left: closing the upstream aborts the request there
                    upstream.close()
                    break
            return response
        finally:
            await upstream_cm.__aexit__(None, None, None)

    # ---- KV-cache use ---------------------------------------------------------------------------------------

    async def scrape_once(self) -> None:
        assert self.session is not None
        replicas = {r for m in self.backends.models() for r in (self.backends.replicas(m) or ())}

        async def one(replica: str) -> None:
            sample = await scrape(self.session, replica + "/metrics", self.config.scrape_interval)
            if sample is not None:
                self.balancer.kv_usage[replica] = sample.kv_usage

        await asyncio.gather(*(one(r) for r in replicas))
        for gone in set(self.balancer.kv_usage) - replicas:
            del self.balancer.kv_usage[gone]

    async def _scrape_forever(self) -> None:
        while True:
            try:
                await self.scrape_once()
            except Exception:  # noqa: BLE001 - the scraper must outlive one bad round
                logger.exception("reading the engines' metrics failed")
            await asyncio.sleep(self.config.scrape_interval)


class ThreadedRouter:
    """A ``Router`` serving on ``host:port`` from its own event loop in a background thread, for a synchronous
    program that embeds one (benchmarks, tests); ``close()`` stops it as the command does."""

    def __init__(self, router: Router, host: str = "127.0.0.1", port: int = 0) -> None:
        import threading

        self.router = router
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        failed: list[BaseException] = []

        async def start() -> None:
            self.runner = web.AppRunner(router.build_app(), access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, host, port)
            await site.start()
            self.port = self.runner.addresses[0][1]

        def run() -> None:
            try:
                self.loop.run_until_complete(start())
            except BaseException as e:  # noqa: BLE001 - handed to the constructor's caller
                failed.append(e)
                return
            finally:
                ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True, name="flotilla-router")
        self.thread.start()
        if not ready.wait(60) or failed:
            raise RuntimeError(f"the router did not start: {failed[0] if failed else 'timed out'}")
        self.base = f"http://{host}:{self.port}"

    def call(self, coroutine: Any, timeout: float = 60.0) -> Any:
        """Run ``coroutine`` on the router's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
