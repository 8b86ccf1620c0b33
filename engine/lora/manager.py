"""One rank's adapters: the slots on its projections and the host copies that fill them.

Every rank runs one ``LoRAManager``. A step's plan names the slot loads rank 0 decided (``SlotTable``); each rank
takes the adapter from its host cache (LRU, ``max_cpu_loras`` adapters) or reads it from its folder, and copies its
share into the slot. Rank 0 also reads adapters when they are registered, so a bad one is refused before any
request uses it, and the first request that uses it finds it on the host.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flotilla.engine.lora.adapter import LoRAAdapter, Target, load_adapter
from flotilla.engine.lora.layers import LoRALayer, attach

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, model: nn.Module, config: Any, max_loras: int, max_rank: int, max_cpu_loras: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.max_rank = max_rank
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self.layers: dict[str, LoRALayer] = attach(model, config, max_loras, max_rank, dtype, device)
        self.targets: dict[str, Target] = {path: layer.target for path, layer in self.layers.items()}
        self._host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # rank 0 reads adapters on the server's threads too
        self.loads = 0  # slot loads, for tests and logs

    def read(self, adapter_id: int, folder: str) -> LoRAAdapter:
        """The adapter's host copy, read (and checked) from its folder when not cached; ``AdapterError`` when the
        engine cannot serve it."""
        with self._lock:
            adapter = self._host.get(adapter_id)
            if adapter is not None:
                self._host.move_to_end(adapter_id)
                return adapter
        adapter = load_adapter(Path(folder), self.targets, self.max_rank)
        with self._lock:
            self._host[adapter_id] = adapter
            while len(self._host) > self.max_cpu_loras:
                self._host.popitem(last=False)
        return adapter

    def forget(self, adapter_id: int) -> None:
        with self._lock:
            self._host.pop(adapter_id, None)

    def cached(self) -> list[int]:
        with self._lock:
            return list(self._host)

    def activate(self, loads: list[tuple[int, int, str, str]]) -> None:
        """Fill slots: ``(slot, adapter id, name, folder)`` each."""
        for slot, adapter_id, name, folder in loads:
            adapter = self.read(adapter_id, folder)
            for path, layer in self.layers.items():
                layer.set_slot(slot, adapter, path)
            self.loads += 1
            logger.info("LoRA adapter %s (id %d) loaded into slot %d", name, adapter_id, slot)
