"""``AsyncLLMEngine``: the engine loop on a worker thread, with an async generator per request.

The event loop never runs model code. Requests are validated on the caller's side (so errors raise in
the caller), handed to the engine thread through a queue, and outputs come back to per-request asyncio
queues. Cancelling the consumer of ``generate`` aborts the request and frees its blocks.

Failures come in two sizes. A request whose own processing raised is stopped by the engine and its consumer
gets ``RequestFailedError``; everything else goes on. If the loop itself fails, every consumer gets
``EngineDeadError``, ``errored`` is set, and ``on_dead`` runs once so the process can exit and be restarted.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, AsyncIterator, Callable

from flotilla.engine.config import EngineArgs
from flotilla.engine.errors import EngineDeadError, QueueFullError, RequestFailedError
from flotilla.engine.llm_engine import LLMEngine, PromptType
from flotilla.engine.lora.request import LoRARequest
from flotilla.engine.outputs import RequestOutput
from flotilla.engine.pooling import PoolingParams
from flotilla.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLMEngine:
    """``max_queue_len`` bounds the sequences waiting to be scheduled; the check and the queueing happen
    under one lock, so a burst of arrivals cannot all pass the check before any of them is counted."""

    def __init__(self, engine: LLMEngine, max_queue_len: int | None = None,
                 on_dead: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.max_queue_len = max_queue_len
        self.on_dead = on_dead
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._queued_sequences = 0  # sequences handed to the engine thread, not yet in the scheduler
        self._wake = threading.Event()
        self._stopped = False
        self.errored: BaseException | None = None
        engine.on_grammar_compiled.append(self._wake.set)  # a request that waited on its grammar may run now
        self._thread = threading.Thread(target=self._loop, name="flotilla-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLMEngine":
        return cls(LLMEngine(args))

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def num_waiting(self) -> int:
        """Sequences waiting to be scheduled, including those not yet handed to the scheduler."""
        return len(self.engine.scheduler.waiting) + self._queued_sequences

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | PoolingParams, request_id: str,
                       cache_salt: str | None = None,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative ``RequestOutput``s until the request finishes (an embedding request, given
        ``PoolingParams``, yields one, with its ``embedding``). Raises ``ValueError`` for bad input and
        ``QueueFullError`` when the queue is full, before anything is queued."""
        self._raise_if_dead()
        if isinstance(sampling_params, PoolingParams):
            parent = self.engine.make_requests(request_id, prompt, None, cache_salt=cache_salt,
                                               pooling_params=sampling_params)
        else:
            parent = self.engine.make_requests(request_id, prompt, sampling_params, cache_salt=cache_salt,
                                               lora_request=lora_request)
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._raise_if_dead()  # under the lock: a loop dying now will deliver to this stream
            if request_id in self._streams:
                raise ValueError(f"request_id: {request_id!r} is already in use")
            limit = self.max_queue_len
            if limit is not None and self.num_waiting() >= limit:
                raise QueueFullError(limit)
            self._queued_sequences += len(parent.children)
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
            self._send("add", parent)
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine has let go of it already
                    raise item
                if item.error is not None:
                    finished = True
                    raise RequestFailedError(request_id, item.error)
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
        self.engine.shutdown()

    def _raise_if_dead(self) -> None:
        if self.errored is not None:
            raise EngineDeadError(f"the engine loop has died: {self.errored}") from self.errored

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
                with self._lock:
                    self._queued_sequences -= len(payload.children)
                    try:
                        self.engine.enqueue(payload)
                    except Exception as e:  # this request's fault (a duplicate id): tell it, keep going
                        self._deliver(payload.request_id, e if isinstance(e, ValueError) else
                                      RequestFailedError(payload.request_id, f"{type(e).__name__}: {e}"))
            else:
                self.engine.abort_request(payload)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        """Hand an output or error to the request's consumer; the caller holds ``self._lock``."""
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:  # that caller's event loop has closed; nobody is listening
                pass

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_commands()
                self.engine.check_alive()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    with self._lock:
                        self._deliver(out.request_id, out)
                if self.engine.grammars_blocking():  # nothing to run until a compilation (or a command) wakes us
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
        except BaseException as e:  # surface to every waiting caller rather than hanging them
            logger.exception("engine loop failed; this engine serves nothing more")
            with self._lock:
                self.errored = e
                for rid in list(self._streams):
                    self._deliver(rid, EngineDeadError(f"the engine loop has died: {type(e).__name__}: {e}"))
            if self.on_dead is not None:
                self.on_dead(e)
