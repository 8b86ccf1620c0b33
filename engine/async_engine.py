"""``AsyncLLMEngine``: the engine loop on a worker thread, with an async generator per request.

The event loop never runs model code. Requests are validated on the caller's side (so errors raise in
the caller), handed to the engine thread through a queue, and outputs come back to per-request asyncio
queues. Cancelling the consumer of ``generate`` aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, AsyncIterator

from flotilla.engine.config import EngineArgs
from flotilla.engine.llm_engine import LLMEngine, PromptType
from flotilla.engine.outputs import RequestOutput
from flotilla.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self.errored: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="flotilla-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLMEngine":
        return cls(LLMEngine(args))

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams, request_id: str,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative ``RequestOutput``s until the request finishes. Raises ``ValueError`` for bad
        input before anything is queued."""
        if self.errored is not None:
            raise RuntimeError("engine loop has died") from self.errored
        parent = self.engine.make_requests(request_id, prompt, sampling_params, cache_salt=cache_salt)
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id: {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send("add", parent)
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (disconnect, cancel): free the blocks now
                self._send("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def num_unfinished(self) -> int:
        return self.engine.get_num_unfinished_requests() + self._commands.qsize()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- engine thread ------------------------------------------------------------------------------

    def _send(self, kind: str, payload: Any) -> None:
        self._commands.put((kind, payload))
        self._wake.set()

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.enqueue(payload)
                except ValueError as e:
                    self._deliver(payload.request_id, e)
            else:
                self.engine.abort_request(payload)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as e:  # surface to every waiting caller rather than hanging them
            logger.exception("engine loop failed")
            self.errored = e
            with self._lock:
                ids = list(self._streams)
            for rid in ids:
                self._deliver(rid, RuntimeError(f"engine loop failed: {e}"))
