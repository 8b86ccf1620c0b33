"""Errors the engine raises to its callers, by who is at fault and what the caller should do.

- ``ValueError`` (Python's own): the request is invalid; nothing was queued (HTTP 400).
- ``QueueFullError``: too many requests wait already; try again later (HTTP 503 + Retry-After).
- ``RequestFailedError``: processing this one request raised; it was stopped and its blocks freed, and every
  other request goes on (HTTP 500).
- ``EngineDeadError``: the engine loop itself failed (a forward pass, out of memory); nothing more will be
  served by this process, which exits so that its supervisor restarts it (HTTP 503).
"""

from __future__ import annotations


class QueueFullError(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the waiting queue is full ({limit} requests)")
        self.limit = limit


class RequestFailedError(RuntimeError):
    def __init__(self, request_id: str, reason: str) -> None:
        super().__init__(f"request {request_id} failed: {reason}")
        self.request_id, self.reason = request_id, reason


class EngineDeadError(RuntimeError):
    pass
