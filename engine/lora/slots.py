"""Which adapter each device slot holds: rank 0's decision, made once per step and sent to every rank as data.

``SlotTable`` is plain bookkeeping (no tensors): a step names the adapters its requests use; adapters already in a
slot stay there, the others take free slots first, then the least recently used slots whose adapter this step does
not need. The loads it returns are what the ranks copy from host memory (or disk) into their slot stacks.
"""

from __future__ import annotations

from collections import OrderedDict


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"max_loras: must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.held: list[int | None] = [None] * num_slots  # adapter id in each slot
        self._recent: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))  # LRU first

    def slot_of(self, adapter_id: int) -> int | None:
        try:
            return self.held.index(adapter_id)
        except ValueError:
            return None

    def assign(self, wanted: list[int]) -> list[tuple[int, int]]:
        """Give every adapter in ``wanted`` a slot (in order of first appearance); returns the (slot, adapter id)
        loads this makes. More distinct adapters than slots is the scheduler's error: it admits no more."""
        distinct = list(dict.fromkeys(wanted))
        if len(distinct) > self.num_slots:
            raise ValueError(f"{len(distinct)} adapters in one step but max_loras is {self.num_slots}")
        loads = []
        for adapter_id in distinct:
            if self.slot_of(adapter_id) is None:
                slot = next(s for s in self._recent if self.held[s] not in distinct)  # free, or not needed now
                self.held[slot] = adapter_id
                loads.append((slot, adapter_id))
        for adapter_id in distinct:
            self._recent.move_to_end(self.slot_of(adapter_id))  # type: ignore[arg-type]
        return loads
