"""``belady``: Belady's MIN, the offline optimum: evict the expert whose next use is farthest away.

Reads the future (simulator only): the simulator calls ``set_future(future)`` and keeps the future
positioned at the step being served; ``future.next_use(key)`` is the index of the next replay step
(token or batched step, times layers) after the current one that needs ``key``, or
``future.NEVER``. A resident key's next use only changes when the key is used, so it is looked up
at each use and arrival and kept in a heap (a binary search per lookup over the key's precomputed
use positions: ``O(log n)`` per access, ``O(n log n)`` per replay).

Victim: the unprotected resident with the largest next use; ties (keys never used again, or used
in the same future step) go to the lowest ``(layer, expert)``. With every request a set of experts
that must be resident together, evicting the farthest next use still minimises the number of
loads (the usual exchange argument only needs the victim not to be requested before the kept
key); ``tests/test_policies.py`` checks it against a brute-force search.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import ConfigError
from ._heap import KeyedHeap
from .base import POLICIES, CppPort, Policy


@POLICIES.register("belady", "offline optimum (MIN): evict the farthest next use; simulator only")
class Belady(Policy):
    name = "belady"
    offline = True

    def __init__(self, capacity: int, num_layers: int, num_experts: int, **kw: Any):
        super().__init__(capacity, num_layers, num_experts, **kw)
        self._future: Any = None
        self._heaps = [KeyedHeap() for _ in range(self.num_pools)]

    def set_future(self, future: Any) -> None:
        self._future = future

    def _next(self, key: int) -> int:
        if self._future is None:
            raise ConfigError(f"policy {self.name!r} reads the future: call set_future() first (the simulator does)")
        return self._future.next_use(key)

    def _prio(self, key: int) -> tuple:
        # negated so that the heap's minimum is the farthest next use, ties to the lowest key
        return (-self._next(key), key)

    def on_access(self, key: int, count: int) -> None:
        if key in self._slot:
            self._heaps[self.pool(key)].set(key, self._prio(key))

    def on_insert(self, key: int) -> None:
        self._heaps[self.pool(key)].set(key, self._prio(key))

    def on_evict(self, key: int) -> None:
        self._heaps[self.pool(key)].discard(key)

    def victim(self, pool: int, protected: Iterable[int]) -> int | None:
        return self._heaps[pool].min(protected)

    def cpp_port(self) -> CppPort:
        """The C++ core's offline MIN (PolicyCode 5)."""
        return CppPort(5)
