"""``static``: static placement by frequency (kTransformers-style), with a few scratch slots.

Fitting: ``fit(counts)`` with ``counts[layer, expert]`` = accesses in a fitting trace. Each pool pins
its ``capacity - scratch`` most frequent experts (layer scope: the layer's own experts; global scope:
all layers' experts together), ranked by count, higher first, ties to the lower ``(layer, expert)``.
``scratch`` defaults to ``top_k`` slots per layer (``top_k`` in layer scope, ``top_k * layers`` in
global scope, at most the capacity): one token's experts fit beside the pinned ones.

Serving: a pinned expert enters on its first use (like any miss; nothing is preloaded, so every
policy starts from the same empty cache) and is never chosen as a victim while an unpinned one can
be; unpinned residents share the scratch slots in LRU order. Victim: the least recently used
unprotected unpinned resident; only if there is none (a batched step needing more experts than the
scratch slots hold), the unprotected pinned resident with the smallest ``(count, key)``.
Cost: ``O(1)`` per access, ``O(1 + protected)`` per eviction (plus the rare pinned fallback scan).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

import numpy as np

from ..errors import ConfigError
from .base import POLICIES, CppPort, Policy


@POLICIES.register("static", "pin the most frequent experts of a fitting trace; LRU scratch slots for the rest")
class Static(Policy):
    name = "static"
    needs_fit = True
    defaults = {"scratch": 0}

    def __init__(self, capacity: int, num_layers: int, num_experts: int, **kw: Any):
        super().__init__(capacity, num_layers, num_experts, **kw)
        per_pool_default = self.top_k * (1 if self.scope == "layer" else self.num_layers)
        scratch = self.params["scratch"] or min(self.capacity, per_pool_default)
        if not 1 <= scratch <= self.capacity:
            raise ConfigError(f"static: scratch must be in 1..capacity ({self.capacity}), got {scratch}")
        self.scratch = scratch
        self.params["scratch"] = scratch  # record the slot count actually used
        self.pinned: frozenset[int] = frozenset()
        self._count = np.zeros(self.num_layers * self.num_experts, np.int64)
        self._lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(self.num_pools)]

    def fit(self, counts: np.ndarray) -> "Static":
        c = np.asarray(counts)
        if c.shape != (self.num_layers, self.num_experts):
            raise ConfigError(f"static.fit wants counts of shape (layers, experts) = "
                              f"{(self.num_layers, self.num_experts)}, got {c.shape}")
        flat = c.reshape(-1).astype(np.int64)
        self._count = flat
        pins = self.capacity - self.scratch
        pinned: list[int] = []
        if self.scope == "layer":
            groups = [np.arange(l * self.num_experts, (l + 1) * self.num_experts) for l in range(self.num_layers)]
        else:
            groups = [np.arange(flat.size)]
        for keys in groups:
            # lexsort: last key is primary -> by count descending, then key ascending
            order = keys[np.lexsort((keys, -flat[keys]))]
            pinned.extend(int(k) for k in order[:pins])
        self.pinned = frozenset(pinned)
        self.fitted = True
        return self

    def on_access(self, key: int, count: int) -> None:
        lru = self._lru[self.pool(key)]
        if key in lru:
            lru.move_to_end(key)

    def on_insert(self, key: int) -> None:
        self._lru[self.pool(key)][key] = None

    def on_evict(self, key: int) -> None:
        del self._lru[self.pool(key)][key]

    def victim(self, pool: int, protected: Iterable[int]) -> int | None:
        pinned = self.pinned
        for key in self._lru[pool]:
            if key not in pinned and key not in protected:
                return key
        best = None
        for key in self._lru[pool]:
            if key not in protected and (best is None or (self._count[key], key) < (self._count[best], best)):
                best = key
        return best

    def cpp_port(self) -> CppPort:
        """The C++ core's static placement (PolicyCode 4): the pinned mask and the fitting counts."""
        pinned = np.zeros(self.num_layers * self.num_experts, np.uint8)
        if self.pinned:
            pinned[np.fromiter(self.pinned, np.int64)] = 1
        counts = np.ascontiguousarray(np.asarray(self._count, np.int64).reshape(-1))
        return CppPort(4, pinned=pinned, counts=counts)
