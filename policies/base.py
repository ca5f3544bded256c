"""The cache policy interface shared by the simulator and the runtime.

A *key* names one expert of one MoE layer: ``key = layer * num_experts + expert``, so ordering keys
orders by ``(layer, expert)`` and "lowest key" is the deterministic tie-break every policy uses last.

The cache holds ``capacity`` slots per *pool*. Scope ``layer`` gives every MoE layer its own pool
(pool = layer, ``capacity`` slots each); scope ``global`` has one pool (pool 0, ``capacity`` slots
for all layers). Slots are numbered ``pool * capacity + i`` and handed out lowest free first, so the
runtime can index one preallocated slot tensor with them.

The base class owns residency and accounting: the resident set, the slot of each key, the free
slots of each pool, and ``insert``, which evicts until the key fits by calling the ONE victim hook.
A policy subclass only keeps its order structure current through the hooks

* ``on_access(key, count)``: a demand use of ``key`` by ``count`` tokens (resident or not; for a miss
  it is called *before* the key is inserted, so history-keeping policies count it);
* ``on_insert(key)``: ``key`` entered the cache (a demand miss or a prefetch);
* ``on_evict(key)``: ``key`` left the cache;

and answers ``victim(pool, protected)``: a resident key of ``pool`` that is not in ``protected``.
``protected`` holds the experts the current (token, layer) needs (and, for prefetches, those already
prefetched for the same upcoming layer); the base class checks every answer against it.

Call protocol (simulator and runtime alike): ``begin_request()`` when a request starts,
``begin_layer(layer)`` when an MoE layer's routing is known, then for each needed expert
``access(key, count)`` and, for a miss that is to be cached, ``insert(key, protected)``. A policy may
decline a missed key (``admit`` returns False: serve it without caching it); only bypass policies do.
Offline policies read the future through ``set_future`` (simulator only); policies with
``uses_scores`` receive predictor probabilities through ``on_scores``; ``needs_fit`` ones get
per-(layer, expert) counts from a fitting trace through ``fit``. Nothing here knows about traces.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import numpy as np

from ..errors import ConfigError
from ..registry import Registry

SCOPES = ("layer", "global")

POLICIES: Registry[type["Policy"]] = Registry("policy")


@dataclass(frozen=True)
class CppPort:
    """How the simulator's C++ core (csrc/sim/policies.h) runs a policy: its ``PolicyCode``
    (csrc/sim/codes.h), one int and one float parameter, static placement's pinned mask and fitting
    counts, further options of ``sim_replay``'s ``extra``, and ``tables(schedule)`` for options that
    depend on the schedule (``moecache.sim.engine_cpp`` passes them on)."""

    code: int
    int_param: int = 0
    float_param: float = 0.0
    pinned: np.ndarray | None = None
    counts: np.ndarray | None = None
    options: dict[str, Any] = field(default_factory=dict)
    tables: Callable[[Any], dict[str, Any]] | None = None


class Policy:
    """Base class: slots, residency and the evict-until-it-fits loop. Subclasses pick victims."""

    name: ClassVar[str] = "base"
    #: Parameters and their defaults; ``__init__`` accepts exactly these (types follow the default).
    defaults: ClassVar[dict[str, Any]] = {}
    #: Reads the future through ``set_future`` (Belady): simulator only.
    offline: ClassVar[bool] = False
    #: Needs ``fit(counts)`` before use (static placement).
    needs_fit: ClassVar[bool] = False
    #: Wants predictor probabilities through ``on_scores``.
    uses_scores: ClassVar[bool] = False
    #: May decline to cache a missed expert (``admit``).
    may_bypass: ClassVar[bool] = False

    def __init__(self, capacity: int, num_layers: int, num_experts: int, *, top_k: int = 1,
                 scope: str = "layer", **params: Any):
        if scope not in SCOPES:
            raise ConfigError(f"unknown scope {scope!r}; valid scopes: {', '.join(SCOPES)}")
        if num_layers < 1 or num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ConfigError(f"a policy needs num_layers >= 1, num_experts >= 1 and top_k in 1..num_experts; got "
                              f"{num_layers}, {num_experts}, {top_k}")
        if int(capacity) < top_k:
            raise ConfigError(f"capacity {capacity} slots per {scope} pool is below top_k={top_k}: one token's "
                              f"experts would not fit at once; use at least {top_k} slots")
        self.capacity = int(capacity)
        self.num_layers = int(num_layers)
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.scope = scope
        self.params = self._check_params(params)
        self.num_pools = self.num_layers if scope == "layer" else 1
        self._slot: dict[int, int] = {}
        # Free slots per pool as min-heaps: the lowest free slot is handed out first.
        self._free: list[list[int]] = [list(range(p * self.capacity, (p + 1) * self.capacity))
                                       for p in range(self.num_pools)]
        self._members: list[set[int]] = [set() for _ in range(self.num_pools)]
        #: Demand accesses so far (one per ``access`` call): the policies' logical clock.
        self.clock = 0
        #: The MoE layer whose routing is being served (``begin_layer``).
        self.layer = 0
        self.fitted = not self.needs_fit

    @classmethod
    def _check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(cls.defaults))
        if unknown:
            valid = ", ".join(f"{k} (default {v})" for k, v in cls.defaults.items()) or "none"
            raise ConfigError(f"policy {cls.name!r} has no parameter(s) {unknown}; valid: {valid}")
        out = dict(cls.defaults)
        for k, v in params.items():
            try:
                out[k] = type(cls.defaults[k])(v)
            except (TypeError, ValueError):
                raise ConfigError(f"policy {cls.name!r}: parameter {k}={v!r} is not a "
                                  f"{type(cls.defaults[k]).__name__}") from None
        return out

    # -- keys and pools ------------------------------------------------------------------------
    def key(self, layer: int, expert: int) -> int:
        return layer * self.num_experts + expert

    def split(self, key: int) -> tuple[int, int]:
        """``(layer, expert)`` of a key."""
        return divmod(key, self.num_experts)

    def pool(self, key: int) -> int:
        return key // self.num_experts if self.num_pools > 1 else 0

    def __contains__(self, key: object) -> bool:
        return key in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def slot(self, key: int) -> int:
        return self._slot[key]

    def resident(self, pool: int | None = None) -> list[int]:
        """Resident keys (of one pool, or all), ascending."""
        if pool is None:
            return sorted(self._slot)
        return sorted(self._members[pool])

    def occupancy(self, pool: int) -> int:
        return len(self._members[pool])

    def describe(self) -> str:
        """``name`` or ``name(k=v,...)`` with every parameter: what a result row records."""
        if not self.params:
            return self.name
        return self.name + "(" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items())) + ")"

    # -- protocol ------------------------------------------------------------------------------
    def begin_request(self) -> None:
        """A new request (sequence) starts."""
        self.on_request()

    def begin_layer(self, layer: int) -> None:
        """The routing of MoE layer ``layer`` is known; its experts are about to be served."""
        self.layer = layer

    def access(self, key: int, count: int = 1) -> None:
        """A demand use of ``key`` by ``count`` tokens, resident or not (call before inserting a miss)."""
        self.clock += 1
        self.on_access(key, count)

    def admit(self, key: int, protected: Iterable[int] = ()) -> bool:
        """Should the missed ``key`` be cached? Only bypass policies ever say no."""
        return True

    def can_insert(self, key: int, protected: Iterable[int] = ()) -> bool:
        """True when ``key`` is resident already, its pool has a free slot, or an unprotected victim exists."""
        if key in self._slot:
            return True
        p = self.pool(key)
        members = self._members[p]
        if len(members) < self.capacity:
            return True
        return any(k not in protected for k in members)

    def insert(self, key: int, protected: Iterable[int] = frozenset()) -> list[int]:
        """Cache ``key``: evict victims (``victim`` hook) until its pool has a free slot. Returns them.

        ``protected`` keys are never evicted. Raises ``ConfigError`` when every resident key of the
        pool is protected (the caller asked for more experts at once than the pool holds).
        """
        if key in self._slot:
            return []
        p = self.pool(key)
        members = self._members[p]
        evicted: list[int] = []
        while len(members) >= self.capacity:
            v = self.victim(p, protected)
            if v is None or v not in members or v in protected:
                if v is None and not any(k not in protected for k in members):
                    raise ConfigError(f"cannot insert expert {self.split(key)}: all {self.capacity} slots of pool {p} "
                                      "hold protected experts; use a larger capacity")
                raise RuntimeError(f"policy {self.name!r} chose victim {v!r}, which is not an unprotected "
                                   f"resident of pool {p}")
            self._remove(v)
            evicted.append(v)
        self._slot[key] = heapq.heappop(self._free[p])
        members.add(key)
        self.on_insert(key)
        return evicted

    def evict(self, key: int) -> None:
        """Remove ``key`` (resident) from the cache, e.g. when the runtime frees its slot."""
        if key not in self._slot:
            raise KeyError(f"expert {self.split(key)} is not resident")
        self._remove(key)

    def _remove(self, key: int) -> None:
        p = self.pool(key)
        slot = self._slot.pop(key)
        self._members[p].discard(key)
        heapq.heappush(self._free[p], slot)
        self.on_evict(key)

    # -- hooks for subclasses ------------------------------------------------------------------
    def on_request(self) -> None:
        """A request starts (per-request state resets here)."""

    def on_access(self, key: int, count: int) -> None:
        """A demand use of ``key`` (resident or not)."""

    def on_insert(self, key: int) -> None:
        """``key`` entered the cache."""

    def on_evict(self, key: int) -> None:
        """``key`` left the cache."""

    def victim(self, pool: int, protected: Iterable[int]) -> int | None:
        """A resident key of ``pool`` not in ``protected`` (None when there is none)."""
        raise NotImplementedError

    # -- optional inputs -----------------------------------------------------------------------
    def set_future(self, future: Any) -> None:
        """Offline policies only: ``future.next_use(key)`` gives the next time ``key`` is needed."""
        raise ConfigError(f"policy {self.name!r} does not read the future")

    def fit(self, counts: np.ndarray) -> "Policy":
        """Learn from ``counts[layer, expert]`` (accesses in a fitting trace). Default: nothing to learn."""
        self.fitted = True
        return self

    def score_depth(self) -> int | None:
        """The predictor depth (MoE layers ahead) whose probabilities ``on_scores`` wants, or None."""
        return None

    def on_scores(self, layer: int, probs: np.ndarray) -> None:
        """Predictor probabilities ``(experts,)`` that each expert of ``layer`` is needed at its next use."""

    def cpp_port(self) -> CppPort | None:
        """This policy as the simulator's C++ core runs it, or None: without a port the simulator
        replays it in Python (``--sim-engine auto`` picks per configuration). A port is an
        accelerator, never a duty; where one exists it must give identical result rows (the
        differential tests of tests/test_sim_cpp.py cover every port)."""
        return None


def new_policy(name: str, capacity: int, num_layers: int, num_experts: int, *, top_k: int = 1,
               scope: str = "layer", **params: Any) -> Policy:
    """Build a registered policy by name (an unknown name lists the valid ones)."""
    return POLICIES.get(name)(capacity, num_layers, num_experts, top_k=top_k, scope=scope, **params)
