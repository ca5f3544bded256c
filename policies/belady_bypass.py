"""``belady_bypass``: Belady's MIN where a miss may be served without entering the cache.

The optimum when the CPU can run a missed expert in place (or a copy can be used once and
dropped). Keys are ranked by their next ``USES`` uses, compared in order (``rank(k)`` = the tuple of
the next 3 steps needing ``k``, padded with "never"): sooner is better. Plain MIN only needs the
first use; with bypass, two keys needed by the same future step are not alike, because the cache
may keep either one afterwards, so the uses after that break the tie.

Candidates are ordered best first by ``(rank, newcomer, -key)``: ties in rank go to residents (a
tie keeps the cache unchanged), then to the higher ``(layer, expert)``, so the worst of several
tied residents is the lowest key, as MIN's victim. The decision is joint over the misses of the
step being served: with ``R`` the pool's unprotected residents, ``M`` the step's misses in that pool
not yet placed (the ``protected`` keys that are not resident, the asked key among them) and ``f``
the pool's free slots, the cache should end up holding the best ``f + |R|`` keys of ``R`` and ``M``;
``admit`` says yes exactly when the asked key is one of them. Equivalently (what is computed): with
``b`` the newcomers of ``M`` better than the key, admit when ``b < f``, or when the ``(b - f + 1)``-th
worst unprotected resident has a worse rank than the key. An admitted miss evicts the worst
unprotected resident (largest rank, ties to the lowest key), which by construction is not among
the keys to keep, so asking key by key in any order ends in the same cache.
``tests/test_policies.py`` checks the result against a brute-force search. Simulator only. Cost:
``O(|M| + b log n)`` per miss on top of ``belady``'s. The simulator consults ``admit`` only under
miss rules that may serve a miss without copying it ("policy", "min"); under "copy" every miss is
cached (victims still by rank).
"""

from __future__ import annotations

from typing import Iterable

from .base import POLICIES, CppPort
from .belady import Belady

USES = 3


@POLICIES.register("belady_bypass", "offline optimum when a miss may skip the cache (CPU runs it); simulator only")
class BeladyBypass(Belady):
    name = "belady_bypass"
    may_bypass = True

    def _rank(self, key: int) -> tuple[int, ...]:
        self._next(key)  # raises a clear error when no future was set
        return self._future.next_uses(key, USES)

    def _prio(self, key: int) -> tuple:
        # heap minimum = the worst: largest rank, ties to the lowest key
        return tuple(-u for u in self._rank(key)) + (key,)

    def admit(self, key: int, protected: Iterable[int] = ()) -> bool:
        if key in self._slot:
            return True
        p = self.pool(key)
        free = self.capacity - len(self._members[p])
        prot = set(protected)
        prot.add(key)
        mine = (self._rank(key), -key)
        better = sum(1 for k in prot if k != key and k not in self._slot and self.pool(k) == p
                     and (self._rank(k), -k) < mine)
        need = better - free + 1  # residents that must rank worse than the key for it to stay
        if need <= 0:
            return True
        worst = self._heaps[p].smallest(need, prot)
        if len(worst) < need:
            return False
        rank_v = tuple(-x for x in worst[-1][:-1])
        return rank_v > mine[0]

    def cpp_port(self) -> CppPort:
        """The C++ core's offline MIN with bypass (PolicyCode 6)."""
        return CppPort(6)
