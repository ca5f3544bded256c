"""Hit rate against cache capacity: LRU and Belady in one pass each, LFU and the best online policy
through the simulator.

Demand hit rate at capacity ``c`` = hits / accesses (an access is one expert of one token at one
layer), with the cache carried over between sequences and every token replayed as its own step
(the simulator's ``decode_stream`` mode; a prefill trace replays as the decode stream it implies).

* ``layer`` scope: every MoE layer has its own cache of ``c`` experts, ``c = top_k .. experts``;
  per-layer curves and the pooled curve (all layers' hits over all accesses).
* ``global`` scope: one cache of ``c`` experts for all layers, ``c = top_k .. layers * experts``.

LRU and Belady come from ``stackdist`` (exact, every capacity). The OPT pass costs
``O(rows * top_k)`` vectorised steps, which for the global scope means ``tokens * layers * top_k``
steps: it runs on the first ``opt_tokens`` tokens (replay order) when the trace is longer, and
the LRU curve on that same prefix is given beside it so the two compare like with like.

LFU and "best online" need per-capacity simulator runs (``moecache.sim.simulate`` with a policy
from ``moecache.policies.POLICIES``); they run on the first ``sim_tokens`` tokens at a few
capacities. *Online* policies are the registered ones that read no future, need no fitting trace
and take no predictor scores; "best online" at a capacity is the highest hit rate among them
there (the winner's name is kept). When the simulator is not installed these curves are absent,
and the report says so.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from ..policies import POLICIES, new_policy
from ..sim import Schedule, simulate
from .access import Accesses
from .stackdist import (hit_curve, hit_curves_by_group, lru_global_distances, lru_layer_distances,
                        opt_global_distances, opt_layer_distances)

#: Capacities (share of a pool's experts) at which the simulator runs and the report tabulates.
DEFAULT_SHARES = (0.125, 0.25, 0.5)


def share_capacity(share: float, pool: int, top_k: int) -> int:
    """Slots for a share of a pool: ``max(top_k, floor(share * pool + 0.5))`` (as ``moecache.sim.capacity``)."""
    return max(top_k, int(math.floor(share * pool + 0.5)))


def _rate(hits: np.ndarray, accesses: int) -> np.ndarray:
    return hits / accesses if accesses else np.full(hits.shape, np.nan)


def stack_curves(acc: Accesses, *, opt_tokens: int | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """LRU and Belady curves for both scopes (see the module docstring)."""
    L, E, k = acc.num_layers, acc.num_experts, acc.top_k
    M = L * E
    T = acc.n_tokens
    n_acc = acc.n_access

    def tick(name: str, total: int) -> Callable[[int], None] | None:
        return None if progress is None else (lambda done: progress(name, done, total))

    lru_l = lru_layer_distances(acc)
    opt_l = opt_layer_distances(acc, tick("Belady, per-layer caches", T))
    per_layer_acc = np.bincount(acc.layer, minlength=L)
    lru_lc = hit_curves_by_group(lru_l, acc.layer, L, E)
    opt_lc = hit_curves_by_group(opt_l, acc.layer, L, E)
    with np.errstate(invalid="ignore", divide="ignore"):
        lru_layer_rate = lru_lc / np.maximum(per_layer_acc, 1)[:, None]
        opt_layer_rate = opt_lc / np.maximum(per_layer_acc, 1)[:, None]
    lru_g = lru_global_distances(acc, tick("LRU, one global cache", n_acc))
    prefix = T if opt_tokens is None else min(T, int(opt_tokens))
    opt_g = opt_global_distances(acc, prefix, tick("Belady, one global cache", prefix * L))
    n_prefix = int(np.searchsorted(acc.token, prefix))  # accesses of the first `prefix` tokens
    # the LRU distances of the prefix's accesses depend on the past only: the full pass's first part
    lru_gp = lru_g[:n_prefix]
    return {
        "layer": {
            "capacities": np.arange(E + 1),
            "min_capacity": k,
            "accesses_per_layer": per_layer_acc,
            "lru": _rate(lru_lc.sum(axis=0), n_acc),
            "belady": _rate(opt_lc.sum(axis=0), n_acc),
            "lru_per_layer": lru_layer_rate,
            "belady_per_layer": opt_layer_rate,
        },
        "global": {
            "capacities": np.arange(M + 1),
            "min_capacity": k,
            "lru": _rate(hit_curve(lru_g, M), n_acc),
            "prefix_tokens": prefix,
            "prefix_accesses": n_prefix,
            "lru_prefix": _rate(hit_curve(lru_gp, M), n_prefix),
            "belady_prefix": _rate(hit_curve(opt_g, M), n_prefix),
        },
        "lru_layer_distances": lru_l,
    }


def online_policies() -> list[str]:
    """Registered policies that are online: no future, no fitting trace, no predictor scores."""
    out = []
    for name in POLICIES.names():
        cls = POLICIES.get(name)
        if not (cls.offline or cls.needs_fit or cls.uses_scores):
            out.append(name)
    return out


def simulate_hit_rates(trace, policies: Sequence[str], capacities: Sequence[int], scope: str) -> dict[str, list[float]]:
    """Demand hit rate of each policy at each capacity, one simulator run each (decode-stream replay)."""
    meta = trace.meta
    sched = Schedule(trace, decode_stream=True)
    out: dict[str, list[float]] = {}
    for name in policies:
        rates = []
        for c in capacities:
            pol = new_policy(name, int(c), meta.num_layers, meta.num_experts, top_k=meta.top_k, scope=scope)
            rates.append(float(simulate(sched, pol, bound=False).demand_hit_rate))
        out[name] = rates
    return out


def simulator_curves(trace, acc: Accesses, *, sim_tokens: int, shares: Sequence[float] = DEFAULT_SHARES,
                     tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """LFU and best-online hit rates at ``shares`` of each scope's pool, on the first ``sim_tokens`` tokens."""
    L, E, k = acc.num_layers, acc.num_experts, acc.top_k
    prefix = min(acc.n_tokens, int(sim_tokens))
    sub = trace.select(np.sort(acc.trace_row[:prefix])) if prefix < acc.n_tokens else trace
    # replay order of `sub` equals the prefix of the full replay order: its rows keep their relative
    # order and whole sequences come first (a cut sequence is the last one)
    names = online_policies()
    out: dict[str, Any] = {"available": True, "prefix_tokens": prefix, "policies": names, "scopes": {}}
    for scope, pool in (("layer", E), ("global", L * E)):
        caps = sorted({share_capacity(s, pool, k) for s in shares})
        per: dict[str, list[float]] = {}
        for name in names:
            per.update(simulate_hit_rates(sub, [name], caps, scope))
            if tick is not None:
                tick()
        best = [max(names, key=lambda n: (per[n][i], -names.index(n))) for i in range(len(caps))]
        out["scopes"][scope] = {
            "capacities": caps,
            "rates": per,
            "lfu": per.get("lfu"),
            "best_online": [per[b][i] for i, b in enumerate(best)],
            "best_online_policy": best,
        }
    return out
