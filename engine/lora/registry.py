"""The adapters an engine serves, by name and id (rank 0, engine level).

Registering resolves the adapter's path as the base model's is resolved (a local folder, a Hugging Face repo id, or
``s3://``: downloaded once into the same cache) and reads it through rank 0's ``LoRAManager``, so an adapter that
cannot be served is refused when it is added, with the reason, and never reaches a step. Requests carry their
``LoRARequest`` and resolved folder; removing an adapter stops new requests from naming it, while requests already
running finish with it.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Callable

from flotilla.engine.lora.manager import LoRAManager
from flotilla.engine.lora.request import LoRARequest


@dataclass(frozen=True)
class Adapter:
    request: LoRARequest
    folder: str  # local, resolved


class LoRARegistry:
    def __init__(self, manager: LoRAManager, resolve: Callable[[str], str]) -> None:
        self.manager = manager
        self._resolve = resolve
        self._by_id: dict[int, Adapter] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._removed: set[int] = set()  # ids unloaded: never registered again (a request racing an unload)

    def new_id(self) -> int:
        """An id no adapter registered here has used (the server's adapters take theirs from here)."""
        with self._lock:
            used = set(self._by_id) | self._removed
            while (i := next(self._ids)) in used:
                pass
            return i

    def add(self, request: LoRARequest) -> bool:
        """Register (and read) an adapter; False when this id is already registered with the same name and path.
        ``ValueError`` when the name or id is taken by another adapter, or the adapter cannot be served."""
        with self._lock:
            if request.lora_int_id in self._removed:
                raise ValueError(f"lora_int_id: {request.lora_int_id} was adapter {request.lora_name!r}, since "
                                 "unloaded; load it again under a new id")
            held = self._by_id.get(request.lora_int_id)
            if held is not None:
                if (held.request.lora_name, held.request.lora_path) == (request.lora_name, request.lora_path):
                    return False
                raise ValueError(f"lora_int_id: {request.lora_int_id} is already adapter "
                                 f"{held.request.lora_name!r}")
            if self._named(request.lora_name) is not None:
                raise ValueError(f"The lora adapter '{request.lora_name}' has already been loaded.")
        folder = self._resolve(request.lora_path)
        self.manager.read(request.lora_int_id, folder)
        with self._lock:
            if request.lora_int_id in self._by_id or self._named(request.lora_name) is not None:  # added meanwhile
                raise ValueError(f"The lora adapter '{request.lora_name}' has already been loaded.")
            self._by_id[request.lora_int_id] = Adapter(request, folder)
        return True

    def remove(self, adapter_id: int) -> bool:
        with self._lock:
            gone = self._by_id.pop(adapter_id, None)
            if gone is not None:
                self._removed.add(adapter_id)
        if gone is not None:
            self.manager.forget(adapter_id)
        return gone is not None

    def get(self, adapter_id: int) -> Adapter | None:
        with self._lock:
            return self._by_id.get(adapter_id)

    def by_name(self, name: str) -> Adapter | None:
        with self._lock:
            return self._named(name)

    def _named(self, name: str) -> Adapter | None:  # under the lock
        return next((a for a in self._by_id.values() if a.request.lora_name == name), None)

    def adapters(self) -> list[Adapter]:
        with self._lock:
            return sorted(self._by_id.values(), key=lambda a: a.request.lora_int_id)
