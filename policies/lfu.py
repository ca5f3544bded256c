"""``lfu``: least frequently used, with decay by periodic halving.

History: ``count[key]`` = tokens that used the key, kept for every key ever used, resident or not
(the key space, layers x experts, is small and fixed, so nothing needs forgetting). Decay: every
``half_life * num_layers * top_k`` demand accesses (about ``half_life`` decode tokens) every count is
halved, ``count >>= 1`` (integer, exact); ``half_life = 0`` never decays (plain LFU). Recency:
``last[key]`` is the clock (demand accesses so far) of the key's last use or arrival.

Victim: the unprotected resident with the smallest ``(count, last, key)``: least frequent, ties to the
least recently used, then to the lowest ``(layer, expert)``. An arriving key keeps its history count (0 if never
used). Cost: ``O(log n)`` per access and insertion (lazy heap), ``O(layers x experts)`` per halving.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import ConfigError
from ._heap import KeyedHeap
from .base import POLICIES, CppPort, Policy


@POLICIES.register("lfu", "least frequently used, counts halved every half_life tokens")
class LFU(Policy):
    name = "lfu"
    defaults = {"half_life": 64}

    def __init__(self, capacity: int, num_layers: int, num_experts: int, **kw: Any):
        super().__init__(capacity, num_layers, num_experts, **kw)
        hl = self.params["half_life"]
        if hl < 0:
            raise ConfigError(f"lfu: half_life must be >= 0 tokens (0 = no decay), got {hl}")
        self._period = hl * self.num_layers * self.top_k
        self._next_halving = self._period
        self._count: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._heaps = [KeyedHeap() for _ in range(self.num_pools)]

    def _prio(self, key: int) -> tuple:
        return (self._count.get(key, 0), self._last.get(key, 0), key)

    def on_access(self, key: int, count: int) -> None:
        if self._period and self.clock >= self._next_halving:
            self._halve()
        self._count[key] = self._count.get(key, 0) + count
        self._last[key] = self.clock
        if key in self._slot:
            self._heaps[self.pool(key)].set(key, self._prio(key))

    def _halve(self) -> None:
        self._next_halving += self._period
        for k in self._count:
            self._count[k] >>= 1
        for p, heap in enumerate(self._heaps):
            heap.rebuild({k: self._prio(k) for k in self._members[p]})

    def on_insert(self, key: int) -> None:
        self._last[key] = max(self._last.get(key, 0), self.clock)
        self._heaps[self.pool(key)].set(key, self._prio(key))

    def on_evict(self, key: int) -> None:
        self._heaps[self.pool(key)].discard(key)

    def victim(self, pool: int, protected: Iterable[int]) -> int | None:
        return self._heaps[pool].min(protected)

    def cpp_port(self) -> CppPort:
        """The C++ core's lfu (PolicyCode 2); int parameter: the halving period in accesses."""
        return CppPort(2, int_param=int(self._period))
