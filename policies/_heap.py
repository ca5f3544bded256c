"""A min-heap of keys by priority with lazy invalidation: the order structure of score policies.

Not a policy (registers nothing). ``set(key, prio)`` records a key's current priority (a tuple
ending in the key, so equal scores fall back to the lowest key); ``min(protected)`` returns the key
with the smallest current priority that is not protected. Entries made stale by a later ``set`` or
by ``discard`` stay in the heap and are dropped when they surface, so every operation is
``O(log n)`` amortised; the heap is rebuilt once stale entries outnumber live ones 3 to 1.
"""

from __future__ import annotations

import heapq
from typing import Container


class KeyedHeap:
    __slots__ = ("_heap", "_cur")

    def __init__(self) -> None:
        self._heap: list[tuple] = []
        self._cur: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self._cur)

    def __contains__(self, key: object) -> bool:
        return key in self._cur

    def set(self, key: int, prio: tuple) -> None:
        """``key``'s priority is now ``prio`` (compared as a tuple; make it end with the key)."""
        if self._cur.get(key) == prio:
            return
        self._cur[key] = prio
        heapq.heappush(self._heap, prio)
        if len(self._heap) > 4 * len(self._cur) + 64:
            self._heap = list(self._cur.values())
            heapq.heapify(self._heap)

    def get(self, key: int) -> tuple | None:
        return self._cur.get(key)

    def discard(self, key: int) -> None:
        self._cur.pop(key, None)

    def rebuild(self, prios: dict[int, tuple]) -> None:
        """Replace every priority at once (e.g. after a decay step rescaled all scores)."""
        self._cur = dict(prios)
        self._heap = list(self._cur.values())
        heapq.heapify(self._heap)

    def smallest(self, n: int, protected: Container[int] = ()) -> list[tuple]:
        """The ``n`` smallest live priorities of keys not in ``protected``, smallest first (fewer if
        there are not that many). ``O(n log size)`` plus the stale entries it drops."""
        heap, cur = self._heap, self._cur
        held: list[tuple] = []
        out: list[tuple] = []
        seen: set[int] = set()
        while heap and len(out) < n:
            prio = heapq.heappop(heap)
            key = prio[-1]
            # stale, or a second entry equal to the live one (a key set back to an earlier priority,
            # e.g. evicted and prefetched again with the same next uses): dropped, each key counts once
            if cur.get(key) != prio or key in seen:
                continue
            seen.add(key)
            held.append(prio)
            if key not in protected:
                out.append(prio)
        for prio in held:
            heapq.heappush(heap, prio)
        return out

    def min(self, protected: Container[int] = ()) -> int | None:
        """The live key with the smallest priority that is not in ``protected`` (None if none)."""
        heap, cur = self._heap, self._cur
        held: list[tuple] = []
        found = None
        while heap:
            prio = heap[0]
            key = prio[-1]
            if cur.get(key) != prio:  # stale: superseded or discarded
                heapq.heappop(heap)
                continue
            if key in protected:
                held.append(heapq.heappop(heap))
                continue
            found = key
            break
        for prio in held:
            heapq.heappush(heap, prio)
        return found
