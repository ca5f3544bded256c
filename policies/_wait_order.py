"""The order structure of ``activation`` and ``predicted``: residents ranked by expected wait, per layer.

Not a policy (registers nothing). Both policies evict the resident with the largest
``T = d(l) + X`` of ``_expected`` (ties: least recently used, then lowest key), where ``d`` depends
only on which layer is being served and ``X`` only on the key's own layer state (its counts, the
layer's step and totals, the predictor's row for that layer). So the keys of one layer keep their
order by ``X`` until that layer's state changes, and the victim of a pool is found by comparing one
candidate per layer instead of scanning every resident:

* per layer, a list of entries ``(-X, last, key)`` sorted ascending (largest ``X`` first, then least
  recent, then lowest key), rebuilt (vectorised ``X``) only when the layer's state changed since it
  was built (``invalidate``); a key inserted into a layer whose list is current waits in a pending
  set and is placed by bisection at the first victim search that could pick it (not while it is
  protected: a step's own misses are, so most never need placing before their layer changes again);
  a removal only drops the key from the live map (its entry is skipped when met, and the list is
  compacted once dead entries outnumber live ones);
* per layer, the ``X`` and key of its first live entry (``top``), so a victim costs one vectorised
  ``d + top`` over the pool's layers plus a walk of the layers whose first entry is protected or
  that tie for the largest ``T``.

It answers exactly what the scan of the whole pool answers: ``T`` is computed as ``d + X`` with the
same floating-point operations, and since ``d + X`` never increases along a layer's list, every key
of a layer whose ``T`` equals the largest lies in one run after the layer's first unprotected entry;
those runs of every tied layer are compared by ``(last, key)`` as the scan's tie-break does.
Cost: ``O(log m)`` per insertion, ``O(m log m)`` per rebuild of a layer of ``m`` residents (at most once
per change of that layer's state), ``O(layers of the pool)`` vectorised plus ``O(|protected|)`` per victim.
"""

from __future__ import annotations

import bisect
from typing import Callable, Container, Iterable

import numpy as np

_NONE = -np.inf


class WaitOrder:
    """Residents of every layer ordered by ``X`` (largest first), ties by ``(last, key)``."""

    __slots__ = ("L", "E", "_valid", "_entries", "_live", "_members", "_top", "_top_key", "_dirty", "_pending")

    def __init__(self, num_layers: int, num_experts: int):
        self.L, self.E = int(num_layers), int(num_experts)
        self._valid = [False] * self.L
        self._entries: list[list[tuple[float, int, int]]] = [[] for _ in range(self.L)]
        self._live: list[dict[int, tuple[float, int, int]]] = [{} for _ in range(self.L)]
        self._members: list[set[int]] = [set() for _ in range(self.L)]
        self._top = np.full(self.L, _NONE)
        self._top_key = np.full(self.L, -1, np.int64)
        self._dirty: set[int] = set()
        # keys inserted into a current list whose X is not computed yet: placed when a victim search
        # may pick them (not while they are protected, as a step's own misses are)
        self._pending: list[set[int]] = [set() for _ in range(self.L)]

    # -- changes -------------------------------------------------------------------------------
    def invalidate(self, layer: int) -> None:
        """The state of ``layer`` changed: every ``X`` of its keys may have moved."""
        if self._valid[layer]:
            self._valid[layer] = False
            self._dirty.add(layer)
            # no candidate until rebuilt (a layer left without residents is never rebuilt)
            self._top[layer], self._top_key[layer] = _NONE, -1

    def invalidate_all(self) -> None:
        for layer in range(self.L):
            self.invalidate(layer)

    def add(self, key: int, last: int, beyond: Callable[[np.ndarray], np.ndarray]) -> None:
        """``key`` became resident (``last`` its tie-break recency; ``beyond(keys)`` gives ``X``)."""
        layer = key // self.E
        self._members[layer].add(key)
        if self._valid[layer]:  # else the rebuild will include it
            self._pending[layer].add(key)

    def _place(self, layer: int, keys: list[int], beyond: Callable[[np.ndarray], np.ndarray],
               last: np.ndarray) -> None:
        """Put pending ``keys`` of a current list in their sorted places (one vectorised ``X``)."""
        k = np.asarray(keys, np.int64)
        x = beyond(k)
        entries, live = self._entries[layer], self._live[layer]
        for xi, li, ki in zip((-x).tolist(), last[k].tolist(), keys):
            entry = (xi, li, ki)
            bisect.insort(entries, entry)
            live[ki] = entry
        self._pending[layer].difference_update(keys)
        self._dirty.add(layer)

    def _resolve(self, layer: int, protected: Container[int], beyond: Callable[[np.ndarray], np.ndarray],
                 last: np.ndarray) -> None:
        """Make the list of ``layer`` current and place its pending keys that are not protected."""
        if not self._valid[layer]:
            self._rebuild(layer, beyond, last)
            self._dirty.add(layer)
            return
        pend = self._pending[layer]
        if pend:
            free = [k for k in pend if k not in protected]
            if free:
                self._place(layer, sorted(free), beyond, last)

    def remove(self, key: int) -> None:
        layer = key // self.E
        self._members[layer].discard(key)
        self._pending[layer].discard(key)
        if self._live[layer].pop(key, None) is not None and self._top_key[layer] == key:
            self._dirty.add(layer)

    # -- queries -------------------------------------------------------------------------------
    def _rebuild(self, layer: int, beyond: Callable[[np.ndarray], np.ndarray], last: np.ndarray) -> None:
        keys = np.fromiter(self._members[layer], np.int64, len(self._members[layer]))
        x = beyond(keys) if keys.size else np.zeros(0)
        lk = last[keys]
        o = np.lexsort((keys, lk, -x))  # the tuples' ascending order, sorted by numpy
        entries = list(zip((-x[o]).tolist(), lk[o].tolist(), keys[o].tolist()))
        self._entries[layer] = entries
        self._live[layer] = {e[2]: e for e in entries}
        self._pending[layer].clear()
        self._valid[layer] = True

    def _refresh_top(self, layer: int) -> None:
        entries, live = self._entries[layer], self._live[layer]
        if len(entries) > 2 * len(live) + 8:  # compact: drop the dead entries
            entries[:] = [e for e in entries if live.get(e[2]) is e]
        for e in entries:
            if live.get(e[2]) is e:
                self._top[layer], self._top_key[layer] = -e[0], e[2]
                return
        self._top[layer], self._top_key[layer] = _NONE, -1

    def _first_free(self, layer: int, protected: Container[int]) -> float:
        """``X`` of the layer's first live entry that is not protected (``-inf`` if none)."""
        live = self._live[layer]
        for e in self._entries[layer]:
            if live.get(e[2]) is e and e[2] not in protected:
                return -e[0]
        return _NONE

    def victim(self, layers: Iterable[int], protected: Container[int] | Iterable[int], dist: np.ndarray,
               beyond: Callable[[np.ndarray], np.ndarray], last: np.ndarray) -> int | None:
        """The unprotected resident of ``layers`` with the largest ``dist[layer] + X``; ties to the
        smallest ``last``, then the smallest key. None when every resident is protected."""
        layers = list(layers)
        if len(layers) == 1:  # layer scope: one list, walked directly
            return self._victim_one(layers[0], protected, float(dist[layers[0]]), beyond, last)
        for layer in layers:
            if self._members[layer]:
                self._resolve(layer, protected, beyond, last)
        for layer in self._dirty:
            if self._valid[layer]:
                self._refresh_top(layer)
        self._dirty = {layer for layer in self._dirty if not self._valid[layer]}
        sel = np.asarray(layers, np.int64)
        t = dist[sel] + self._top[sel]
        pos = {layer: i for i, layer in enumerate(layers)} if len(layers) > 1 else {layers[0]: 0}
        for k in protected:
            layer = k // self.E
            i = pos.get(layer)
            if i is not None and self._top_key[layer] == k:
                t[i] = dist[layer] + self._first_free(layer, protected)
        t_max = t.max() if t.size else _NONE
        if t_max == _NONE:
            return None
        best: tuple[int, int] | None = None
        for i in np.flatnonzero(t == t_max).tolist():
            layer = layers[i]
            d, live = dist[layer], self._live[layer]
            for e in self._entries[layer]:
                key = e[2]
                if live.get(key) is not e or key in protected:
                    continue
                w = d + (-e[0])
                if w < t_max:
                    break
                cand = (e[1], key)
                if best is None or cand < best:
                    best = cand
        return None if best is None else best[1]

    def _victim_one(self, layer: int, protected: Container[int], d: float,
                    beyond: Callable[[np.ndarray], np.ndarray], last: np.ndarray) -> int | None:
        self._resolve(layer, protected, beyond, last)
        live = self._live[layer]
        t_max = None
        best: tuple[int, int] | None = None
        for e in self._entries[layer]:
            key = e[2]
            if live.get(key) is not e or key in protected:
                continue
            w = d + (-e[0])
            if t_max is None:
                t_max = w
            elif w < t_max:
                break
            cand = (e[1], key)
            if best is None or cand < best:
                best = cand
        return None if best is None else best[1]
