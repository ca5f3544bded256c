"""One trace in, every figure of the report out: runs the metric modules and rounds their results.

``analyze_trace`` returns ``(summary, data)``: ``summary`` is the JSON-ready dict of the figures the
report prints (floats rounded to ``DIGITS`` decimals, NaN as None), ``data`` the full arrays the
plots and the CSV files beside the report are drawn from. Each metric module documents its
formulas; this module only decides what is computed with which parameters.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError
from . import affinity as aff
from . import consistency as cons
from . import curves
from . import locality as loc
from . import popularity as pop
from . import variation as var
from .access import accesses

DIGITS = 4


@dataclass
class Options:
    """What ``moecache analyze`` computes; every field is recorded in summary.json."""

    windows: tuple[int, ...] = loc.DEFAULT_WINDOWS
    segments: tuple[int, ...] = cons.DEFAULT_SEGMENTS
    depths: tuple[int, ...] = aff.DEFAULT_DEPTHS
    shares: tuple[float, ...] = curves.DEFAULT_SHARES
    opt_tokens: int = 1000  #: Belady (global scope) on at most this many tokens
    sim_tokens: int = 250  #: simulator runs (LFU, best online) on at most this many tokens
    simulate: bool = True
    min_seq_tokens: int = 32

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def r(x: Any) -> Any:
    """Round for the summary: floats to DIGITS decimals, NaN/inf to None, numpy scalars to Python."""
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return None if not math.isfinite(x) else round(x, DIGITS)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.ndarray):
        return [r(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [r(v) for v in x]
    if isinstance(x, dict):
        return {k: r(v) for k, v in x.items()}
    return x


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _quantiles(x: np.ndarray) -> dict[str, Any]:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return {"count": 0, "p10": None, "median": None, "p90": None, "mean": None}
    return {"count": int(len(x)), "p10": float(np.quantile(x, 0.1)), "median": float(np.median(x)),
            "p90": float(np.quantile(x, 0.9)), "mean": float(x.mean())}


def pick_affinity_layer(num_layers: int) -> int:
    """The source layer of the affinity heatmap: the middle pair ``(L // 2 - 1, L // 2)`` (0 if L < 2)."""
    return max(0, num_layers // 2 - 1)


def analyze_trace(trace, options: Options | None = None, name: str | None = None,
                  progress: Callable[[str], None] | None = None,
                  bar: Callable[[str, int, int], None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every metric of one trace: ``(summary, data)`` (see the module docstring)."""
    opt = options or Options()
    say = progress or (lambda _msg: None)
    meta = trace.meta
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    if len(trace) == 0:
        raise ConfigError(f"trace {trace.path or name} has no tokens: nothing to analyse")
    label = name or os.path.basename(str(trace.path or meta.model).rstrip(os.sep))
    say("access stream")
    acc = accesses(trace)
    if acc.n_access == 0:
        raise ConfigError(f"trace {label} has no expert accesses (every slot is missing or dropped)")
    layers = list(meta.moe_layers)
    data: dict[str, Any] = {"label": label, "moe_layers": layers, "num_experts": E, "top_k": k}
    s: dict[str, Any] = {
        "name": label, "path": str(trace.path) if trace.path else None, "model": meta.model,
        "tokens": acc.n_tokens, "sequences": acc.n_sequences, "layers": L, "experts": E, "top_k": k,
        "accesses": acc.n_access, "duplicate_slots": acc.duplicate_slots, "missing_slots": acc.missing_slots,
        "dropped_slots": acc.dropped_slots,
    }

    say("popularity")
    p = pop.popularity(acc)
    data["popularity"] = p
    s["popularity"] = {
        "top10_experts": p["top10_experts"],
        "mean": {"entropy_bits": _nanmean(p["entropy_bits"]), "entropy_norm": _nanmean(p["entropy_norm"]),
                 "gini": _nanmean(p["gini"]), "top10_share": _nanmean(p["top10_share"]),
                 "unused": int(sum(len(u) for u in p["unused"]))},
        "layers": [{"layer": layers[l], "entropy_bits": p["entropy_bits"][l], "entropy_norm": p["entropy_norm"][l],
                    "gini": p["gini"][l], "top10_share": p["top10_share"][l], "unused_count": len(p["unused"][l]),
                    "unused": p["unused"][l]} for l in range(L)],
    }

    say("cache curves (LRU and Belady stack distances)")
    sc = curves.stack_curves(acc, opt_tokens=opt.opt_tokens, progress=bar)
    data["curves"] = sc

    say("reuse distances and temporal locality")
    dist = sc["lru_layer_distances"]
    warm = dist[dist >= 0]
    edges = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    edges = [e for e in edges if e < E] + [E]
    hist, _ = np.histogram(warm, bins=edges)
    data["reuse_hist"] = {"edges": edges, "counts": hist, "cold": int((dist < 0).sum()),
                          "all": np.bincount(warm, minlength=E)}
    gaps = loc.reuse_gaps(acc)
    tl = loc.temporal_locality(acc, opt.windows, gaps)
    data["locality"] = tl
    s["reuse"] = {
        "bins": [f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])],
        "counts": hist, "first_use": int((dist < 0).sum()),
        "median": float(np.median(warm)) if len(warm) else None,
        "mean": float(warm.mean()) if len(warm) else None,
    }
    s["temporal_locality"] = {
        "windows": tl["windows"], "mean": tl["mean"], "scored": tl["scored"].sum(axis=1),
        "layers": [{"layer": layers[l], "prob": tl["prob"][:, l]} for l in range(L)],
    }

    say("local routing consistency")
    cv = cons.coverage(acc, opt.segments)
    data["consistency"] = cv
    s["consistency"] = {
        "segments": cv["segments"], "sizes": cv["sizes"], "n_segments": cv["n_segments"][:-1],
        "tail_tokens": cv["tail_tokens"][:-1],
        "rows": [{"segment": seg, "coverage": cv["mean"][i]} for i, seg in enumerate(cv["segments"])],
        "static": cv["mean"][-1],
    }

    say("cross-layer affinity")
    src = pick_affinity_layer(L)
    af = aff.affinity(acc, opt.depths, keep_matrices=[(src, 1)] if L > 1 else [])
    data["affinity"] = af
    data["affinity_pair"] = (src, 1)
    s["affinity"] = {
        "depths": af["depths"],
        "per_depth": [{"depth": d, "mi": _nanmean(af["mi"][i]), "mi_shuffled": _nanmean(af["mi_shuffled"][i]),
                       "nmi": _nanmean(af["nmi"][i]), "top1_cond": _nanmean(af["top1_cond"][i]),
                       "top1_prior": _nanmean(af["top1_prior"][i])} for i, d in enumerate(af["depths"])],
        "heatmap_pair": [layers[src], layers[src + 1]] if L > 1 else None,
    }

    say("phases and sequences")
    ph = var.phases(acc, gaps)
    data["phases"] = ph
    s["phases"] = {"phases": [{"phase": n, **v} for n, v in ph["phases"].items()],
                   "jsd_prefill_decode_mean": ph["jsd_prefill_decode_mean"],
                   "jsd_prefill_decode": ph["jsd_prefill_decode"]}
    sq = var.sequences(acc, gaps, p["share"])
    data["sequences"] = sq
    long = sq["tokens"] >= opt.min_seq_tokens
    s["per_sequence"] = {
        "count": acc.n_sequences, "min_tokens": opt.min_seq_tokens,
        "tokens": _quantiles(sq["tokens"]), "jsd": _quantiles(sq["jsd"]), "reuse1": _quantiles(sq["reuse1"]),
        "long_count": int(long.sum()), "jsd_long": _quantiles(sq["jsd"][long]),
        "reuse1_long": _quantiles(sq["reuse1"][long]),
    }

    sim = {"available": False, "reason": "disabled (--no-simulate)"}
    if opt.simulate:
        say("simulator runs (LFU, best online policy)")
        sim = curves.simulator_curves(trace, acc, sim_tokens=opt.sim_tokens, shares=opt.shares)
    data["sim"] = sim
    s["cache"] = _cache_summary(sc, sim, opt, L, E, k, layers)
    return r(s), data


def _cache_summary(sc: dict, sim: dict, opt: Options, L: int, E: int, k: int, layers: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"simulator": {"available": bool(sim.get("available")),
                                          "reason": sim.get("reason"),
                                          "prefix_tokens": sim.get("prefix_tokens"),
                                          "policies": sim.get("policies")}}
    for scope, pool in (("layer", E), ("global", L * E)):
        c = sc[scope]
        caps = sorted({curves.share_capacity(x, pool, k) for x in opt.shares})
        rows = []
        simsc = sim.get("scopes", {}).get(scope) if sim.get("available") else None
        for cap in caps:
            row: dict[str, Any] = {"capacity": cap, "share": cap / pool, "lru": c["lru"][cap]}
            if scope == "layer":
                row["belady"] = c["belady"][cap]
            else:
                row["lru_prefix"] = c["lru_prefix"][cap]
                row["belady_prefix"] = c["belady_prefix"][cap]
            if simsc is not None and cap in simsc["capacities"]:
                i = simsc["capacities"].index(cap)
                row["lfu_sim"] = simsc["lfu"][i] if simsc["lfu"] is not None else None
                row["lru_sim"] = simsc["rates"].get("lru", [None] * len(caps))[i]
                row["best_online_sim"] = simsc["best_online"][i]
                row["best_online_policy"] = simsc["best_online_policy"][i]
            rows.append(row)
        out[scope] = {"pool": pool, "rows": rows}
    out["global"]["prefix_tokens"] = sc["global"]["prefix_tokens"]
    mid = curves.share_capacity(0.25, E, k)
    out["layer"]["per_layer_capacity"] = mid
    out["layer"]["per_layer"] = [{"layer": layers[l], "lru": sc["layer"]["lru_per_layer"][l, mid],
                                  "belady": sc["layer"]["belady_per_layer"][l, mid]} for l in range(L)]
    return out
