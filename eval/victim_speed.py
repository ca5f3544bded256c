"""Victim search of ``activation`` and ``predicted``: the order structure against the pool scan.

    python eval/victim_speed.py [--trace build/suite_traces/deepseek-v2-lite] [--seqs 20] [--repeats 3]
                                [--out-dir eval/results]

Replays the first ``--seqs`` prompts of the DeepSeek-V2-Lite trace token by token (decode stream) on
the Python reference engine (the policy objects the runtime uses), at 25% of expert memory in layer
and global scope, ``predicted`` with the ``temporal`` predictor one layer ahead. Each configuration
runs with the policy as shipped (``WaitOrder``: per-layer sorted residents) and with the reference
scan of the whole pool (``victim_scan``; its order structure switched off), interleaved, ``--repeats``
times; the two runs' result rows must be equal (checked). Reports accesses per second (median and
range) and the policy's host time per eviction. Writes ``victim_speed.json`` and ``.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ["MOECACHE_DISABLE_EXT"] = "1"  # the Python engine: the policy objects of the runtime

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _NoOrder:
    """Stands in for WaitOrder in the scan baseline: keeps nothing."""

    def invalidate(self, layer):
        pass

    def invalidate_all(self):
        pass

    def add(self, key, last, beyond):
        pass

    def remove(self, key):
        pass


def scan_variant(cls):
    class Scan(cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._order = _NoOrder()

        def victim(self, pool, protected):
            return self.victim_scan(pool, protected)
    Scan.__name__ = cls.__name__ + "Scan"
    return Scan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, default=ROOT / "build" / "suite_traces" / "deepseek-v2-lite")
    ap.add_argument("--seqs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "eval" / "results")
    args = ap.parse_args(argv)
    if not args.trace.exists():
        print(f"skip: no trace at {args.trace} (build it with eval/suite_traces.py)")
        return 0
    from moecache.policies import POLICIES
    from moecache.predictors import PREDICTORS
    from moecache.sim import Schedule, resolve_capacity, simulate
    from moecache.trace import open_trace

    trace = open_trace(args.trace)
    trace = trace.select_sequences(trace.sequences()[: args.seqs])
    L, E, K = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    sched = Schedule(trace, decode_stream=True, name="deepseek-v2-lite")
    configs = [(name, scope) for name in ("activation", "predicted") for scope in ("layer", "global")]
    times: dict[tuple, dict[str, list[float]]] = {c: {"order": [], "scan": []} for c in configs}
    evictions: dict[tuple, int] = {}
    accesses = 0
    for _ in range(args.repeats):
        for name, scope in configs:
            rows = {}
            for variant in ("order", "scan"):
                cls = POLICIES.get(name)
                cls = cls if variant == "order" else scan_variant(cls)
                cap = resolve_capacity("25%", L, E, K, scope)
                pol = cls(cap, L, E, top_k=K, scope=scope)
                pred = PREDICTORS.get("temporal")(L, E, K) if name == "predicted" else None
                t0 = time.perf_counter()
                res = simulate(sched, pol, pred, depth=1 if pred else 0, bound=False, engine="python")
                times[(name, scope)][variant].append(time.perf_counter() - t0)
                row = res.row()
                row.pop("policy", None)
                rows[variant] = row
                accesses = res.accesses
                evictions[(name, scope)] = res.loads + res.prefetches
            if rows["order"] != rows["scan"]:
                raise SystemExit(f"{name} {scope}: the order structure and the scan disagree")
            print(name, scope, {v: round(t[-1], 2) for v, t in times[(name, scope)].items()}, file=sys.stderr)
    out_rows = []
    for (name, scope), t in times.items():
        r = {"policy": name, "scope": scope, "needs": sched.tokens * L, "accesses": accesses}
        for v in ("order", "scan"):
            med = statistics.median(t[v])
            r[v] = {"median_s": med, "min_s": min(t[v]), "max_s": max(t[v]),
                    "accesses_per_s": accesses / med}
        r["speedup"] = r["scan"]["median_s"] / r["order"]["median_s"]
        out_rows.append(r)
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores, shared), "
                      f"Python {platform.python_version()}, one thread",
           "command": "python eval/victim_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "trace": f"DeepSeek-V2-Lite, first {args.seqs} prompts ({sched.tokens} tokens), decode stream",
           "repeats": args.repeats, "rows": out_rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "victim_speed.json").write_text(json.dumps(out, indent=1))
    md = ["# Victim search: order structure vs pool scan (activation, predicted; Python engine)", "",
          f"- date: {out['date']}; machine: {out['machine']}", f"- command: `{out['command']}`",
          f"- {out['trace']}, 25% of expert memory; predicted with temporal, prefetch depth 1. "
          f"Median of {args.repeats} interleaved repeats, range in brackets; result rows identical (checked).", "",
          "| policy | scope | order: accesses/s | scan: accesses/s | speedup |", "| --- | --- | --- | --- | --- |"]
    for r in out_rows:
        o, s = r["order"], r["scan"]
        md.append(f"| {r['policy']} | {r['scope']} | {o['accesses_per_s']:,.0f} [{r['accesses'] / o['max_s']:,.0f}-"
                  f"{r['accesses'] / o['min_s']:,.0f}] | {s['accesses_per_s']:,.0f} [{r['accesses'] / s['max_s']:,.0f}-"
                  f"{r['accesses'] / s['min_s']:,.0f}] | {r['speedup']:.2f}x |")
    (args.out_dir / "victim_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
