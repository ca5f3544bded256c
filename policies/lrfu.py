"""``lrfu``: LRFU's combined recency and frequency (CRF), exponentially decayed.

``CRF(key, t) = sum over the key's uses i of count_i * 2^(-lam * (t - t_i))``, with ``t`` the clock
(demand accesses so far) and ``lam = 1 / (half_life * num_layers * top_k)``, so a use loses half its
weight after about ``half_life`` decode tokens. Small ``half_life`` approaches LRU, large approaches
LFU. History is kept for every key ever used, resident or not.

Stored in log form, which never needs rescaling: ``K = log2(sum_i count_i * 2^(lam * t_i))``, since
``CRF(t) = 2^(K - lam * t)`` for every key at once and comparing ``K`` compares CRFs. A use of
``count`` tokens at time ``t`` updates ``K = lam*t + log2(count + exp2(K - lam*t))`` (first use:
``K = lam*t + log2(count)``), computed in exactly that order (``lam*t`` once, then ``exp2``, the
addition, ``log2``, the final addition), so the C++ engine reproduces it with the same libm.

Victim: the unprotected resident with the smallest ``(K, key)``; a key never used (a prefetch that
has not been used yet) has ``K = -inf`` and goes first; ties go to the lowest ``(layer, expert)``.
Cost: ``O(log n)`` per access (lazy heap).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from ..errors import ConfigError
from ._heap import KeyedHeap
from .base import POLICIES, CppPort, Policy


@POLICIES.register("lrfu", "recency-frequency value (CRF) decayed with half-life half_life tokens")
class LRFU(Policy):
    name = "lrfu"
    defaults = {"half_life": 16.0}

    def __init__(self, capacity: int, num_layers: int, num_experts: int, **kw: Any):
        super().__init__(capacity, num_layers, num_experts, **kw)
        hl = self.params["half_life"]
        if not hl > 0:
            raise ConfigError(f"lrfu: half_life must be > 0 tokens, got {hl}")
        self.lam = 1.0 / (hl * self.num_layers * self.top_k)
        self._k: dict[int, float] = {}
        self._heaps = [KeyedHeap() for _ in range(self.num_pools)]

    def crf(self, key: int) -> float:
        """The key's CRF now (0 for a key never used)."""
        k = self._k.get(key)
        return 0.0 if k is None else math.exp2(k - self.lam * self.clock)

    def on_access(self, key: int, count: int) -> None:
        now = self.lam * self.clock
        old = self._k.get(key)
        if old is None:
            self._k[key] = now + math.log2(count)
        else:
            self._k[key] = now + math.log2(count + math.exp2(old - now))
        if key in self._slot:
            self._heaps[self.pool(key)].set(key, (self._k[key], key))

    def on_insert(self, key: int) -> None:
        self._heaps[self.pool(key)].set(key, (self._k.get(key, -math.inf), key))

    def on_evict(self, key: int) -> None:
        self._heaps[self.pool(key)].discard(key)

    def victim(self, pool: int, protected: Iterable[int]) -> int | None:
        return self._heaps[pool].min(protected)

    def cpp_port(self) -> CppPort:
        """The C++ core's lrfu (PolicyCode 3); float parameter: ``lam``, the very double used here."""
        return CppPort(3, float_param=float(self.lam))
