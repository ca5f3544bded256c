"""``lru``: least recently used.

Order: every pool keeps its keys from least to most recently *used*, where a use is a demand access
or an insertion (a prefetched expert counts as used when it arrives). Victim: the least recently
used key of the pool that is not protected. Ties cannot occur (the order is strict); when several
keys are touched in one step the caller's order decides, and the simulator touches a step's
experts in ascending key order. Cost: ``O(1)`` per access and insertion, ``O(1 + protected)`` per
eviction.
"""

from __future__ import annotations

from .base import POLICIES, CppPort
from .fifo import FIFO


@POLICIES.register("lru", "least recently used (demand use or arrival)")
class LRU(FIFO):
    """FIFO's insertion order, refreshed on every use: the front of each pool is the least recently used."""

    name = "lru"

    def on_access(self, key: int, count: int) -> None:
        order = self._order[self.pool(key)]
        if key in order:
            order.move_to_end(key)

    def cpp_port(self) -> CppPort:
        """The C++ core's lru (PolicyCode 0)."""
        return CppPort(0)
