"""``fifo``: first in, first out.

Order: every pool keeps its keys in order of insertion; accesses change nothing. Victim: the
earliest-inserted key of the pool that is not protected. The order is strict (no ties); keys
inserted in one step enter in the caller's order (ascending key in the simulator). Cost: ``O(1)``
per insertion, ``O(1 + protected)`` per eviction, nothing per access.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

from .base import POLICIES, CppPort, Policy


@POLICIES.register("fifo", "first in, first out (insertion order, accesses ignored)")
class FIFO(Policy):
    name = "fifo"

    def __init__(self, capacity: int, num_layers: int, num_experts: int, **kw: Any):
        super().__init__(capacity, num_layers, num_experts, **kw)
        self._order: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(self.num_pools)]

    def on_insert(self, key: int) -> None:
        self._order[self.pool(key)][key] = None

    def on_evict(self, key: int) -> None:
        del self._order[self.pool(key)][key]

    def victim(self, pool: int, protected: Iterable[int]) -> int | None:
        for key in self._order[pool]:
            if key not in protected:
                return key
        return None

    def cpp_port(self) -> CppPort:
        """The C++ core's fifo (PolicyCode 1)."""
        return CppPort(1)
