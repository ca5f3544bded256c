"""``lru``: least recently used.

Order: every pool keeps its keys from least to most recently *used*, where a use is a demand access
or an insertion (a prefetched expert counts as used when it arrives). Victim: the least recently
used key of the pool that is not protected. Ties cannot occur (the order is strict); when several
keys are touched in one step the caller's order decides, and the simulator touches a step's
experts in ascending key order. Cost: ``O(1)`` per access and insertion, ``O(1 + protected)`` per
eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

from .base import POLICIES, Policy


@POLICIES.register("lru", "least recently used (demand use or arrival)")
class LRU(Policy):
    name = "lru"

    def __init__(self, capacity: int, num_layers: int, num_experts: int, **kw: Any):
        super().__init__(capacity, num_layers, num_experts, **kw)
        self._order: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(self.num_pools)]

    def on_access(self, key: int, count: int) -> None:
        order = self._order[self.pool(key)]
        if key in order:
            order.move_to_end(key)

    def on_insert(self, key: int) -> None:
        self._order[self.pool(key)][key] = None

    def on_evict(self, key: int) -> None:
        del self._order[self.pool(key)][key]

    def victim(self, pool: int, protected: Iterable[int]) -> int | None:
        for key in self._order[pool]:
            if key not in protected:
                return key
        return None
