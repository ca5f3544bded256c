"""Victim search of ``activation`` and ``predicted``: ordered structures against the pool scan.

    python eval/victim_speed.py [--trace build/suite_traces/deepseek-v2-lite] [--seqs 10] [--cpp-seqs 200]
                                [--repeats 3] [--engines python,cpp] [--out-dir eval/results]
    python eval/victim_speed.py --render      # rewrite victim_speed.md from victim_speed.json

Replays prompts of the DeepSeek-V2-Lite trace token by token (decode stream) at 25% of expert memory
in layer and global scope, ``predicted`` with the ``temporal`` predictor one layer ahead, on two engines:

* ``python``: the reference engine (the policy objects the runtime uses), the first ``--seqs`` prompts;
  the policy as shipped (``WaitOrder``: per-layer sorted residents) against the reference scan of the
  whole pool (``victim_scan``; its order structure switched off);
* ``cpp``: the C++ core, the first ``--cpp-seqs`` prompts; its per-layer sorted lists against its pool
  scan (``engine_cpp.TUNING["wait_scan_max"]`` forces either layout; by default the core keeps global
  pools of more than 32 slots sorted and scans the others); and a sweep of ``activation`` over pool
  sizes (``--sweep-layer``, ``--sweep-global``), the measurement behind those defaults.

Each configuration runs both variants, interleaved, ``--repeats`` times (the C++ core after one warm-up
call); the two variants' result rows
must be equal (checked). Reports accesses per second (median and range), the 1-minute load average
before each repeat (other jobs share the machine) and the thread count. Writes ``victim_speed.json``
and ``.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("python", "cpp")


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


@contextlib.contextmanager
def _variant(engine: str, variant: str):
    """The Python engine with the extension disabled; the C++ core with its layout forced."""
    from moecache._ext import ENV_DISABLE
    from moecache.sim import engine_cpp

    old_env, old_tuning = os.environ.get(ENV_DISABLE), dict(engine_cpp.TUNING)
    if engine == "python":
        os.environ[ENV_DISABLE] = "1"
    else:
        engine_cpp.TUNING["wait_scan_max"] = 0 if variant == "order" else 1 << 40
    try:
        yield
    finally:
        engine_cpp.TUNING.update(old_tuning)
        if old_env is None:
            os.environ.pop(ENV_DISABLE, None)
        else:
            os.environ[ENV_DISABLE] = old_env


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _slots(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of slot counts, e.g. 16,32") from None
    if any(n < 1 for n in out):
        raise argparse.ArgumentTypeError(f"slot counts must be >= 1, got {text!r}")
    return out


def render(out: dict) -> str:
    """The Markdown report of a run (``out`` as written to victim_speed.json)."""
    loads = out["load_average_1min"]
    md = ["# Victim search: ordered structures vs pool scan (activation, predicted)", "",
          f"- date: {out['date']}; machine: {out['machine']}; {out['threads']}",
          f"- command: `{out['command']}`",
          f"- 1-minute load average before each repeat and at the end: {', '.join(f'{x:.2f}' for x in loads)}",
          f"- {out['trace']}; predicted with temporal, prefetch depth 1. Median of {out['repeats']} interleaved "
          "repeats, range in brackets; both variants' result rows identical (checked).",
          "- order: Python `WaitOrder` / C++ per-layer sorted lists; scan: every unprotected resident of the pool "
          "scored per eviction. The C++ core's default is the sorted lists for global pools of more than 32 "
          "slots and the scan for layer-scope pools. saved/eviction: (scan - order) median time over the "
          "replay's evictions (its copies, demand and prefetch, less the slots they first filled; prefetches "
          "refused by the admission rule searched a victim too and are not counted).", "",
          "| engine | policy | scope | prompts | accesses | order: accesses/s | scan: accesses/s | speedup "
          "| saved/eviction |",
          "| --- | --- | --- | ---: | ---: | --- | --- | ---: | ---: |"]
    for r in out["rows"]:
        if r.get("sweep"):
            continue
        o, s, a = r["order"], r["scan"], r["accesses"]
        evictions = r["loads"] + r["prefetches"] - r["slots"]  # every insert once the pools are full
        saved = (s["median_s"] - o["median_s"]) / evictions * 1e6 if evictions > 0 else float("nan")
        md.append(f"| {r['engine']} | {r['policy']} | {r['scope']} | {r['prompts']} | {a:,} | "
                  f"{o['accesses_per_s']:,.0f} [{a / o['max_s']:,.0f}-{a / o['min_s']:,.0f}] | "
                  f"{s['accesses_per_s']:,.0f} [{a / s['max_s']:,.0f}-{a / s['min_s']:,.0f}] | {r['speedup']:.2f}x "
                  f"| {saved:.2f} us |")
    sweep = [r for r in out["rows"] if r.get("sweep")]
    if sweep:
        md += ["", f"Layout sweep (C++ core, activation, {sweep[0]['prompts']} prompts; where the default "
               "thresholds come from):", "",
               "| scope | slots per pool | order: median s | scan: median s | speedup of order |",
               "| --- | ---: | ---: | ---: | ---: |"]
        for r in sweep:
            md.append(f"| {r['scope']} | {r['capacity']} | {r['order']['median_s']:.3f} "
                      f"[{r['order']['min_s']:.3f}-{r['order']['max_s']:.3f}] | {r['scan']['median_s']:.3f} "
                      f"[{r['scan']['min_s']:.3f}-{r['scan']['max_s']:.3f}] | {r['speedup']:.2f}x |")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, default=ROOT / "build" / "suite_traces" / "deepseek-v2-lite")
    ap.add_argument("--seqs", type=int, default=10, help="prompts replayed by the Python engine")
    ap.add_argument("--cpp-seqs", type=int, default=200, help="prompts replayed by the C++ core")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="python,cpp", help="comma-separated: python, cpp")
    ap.add_argument("--sweep-layer", type=_slots, default=[8, 16, 32, 48],
                    help="C++ core, activation: layer-scope pool sizes (slots per layer) of the layout sweep")
    ap.add_argument("--sweep-global", type=_slots, default=[16, 32, 64, 128],
                    help="C++ core, activation: global pool sizes (slots) of the layout sweep")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "eval" / "results")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite victim_speed.md from the victim_speed.json in --out-dir")
    args = ap.parse_args(argv)
    if args.render:
        src = args.out_dir / "victim_speed.json"
        if not src.is_file():
            raise SystemExit(f"victim_speed: no {src} to render; run the benchmark first")
        md = render(json.loads(src.read_text()))
        tmp = args.out_dir / "victim_speed.md.tmp"
        tmp.write_text(md)
        os.replace(tmp, args.out_dir / "victim_speed.md")
        print(md, end="")
        return 0
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise SystemExit(f"victim_speed: unknown engine(s) {bad or args.engines!r}; use python, cpp or both")
    if args.repeats < 1 or args.seqs < 1 or args.cpp_seqs < 1:
        raise SystemExit("victim_speed: --repeats, --seqs and --cpp-seqs must be >= 1")
    if not args.trace.exists():
        print(f"skip: no trace at {args.trace} (build it with eval/suite_traces.py)")
        return 0
    from moecache._ext import extension
    from moecache.policies import POLICIES
    from moecache.predictors import PREDICTORS
    from moecache.sim import Schedule, resolve_capacity, simulate
    from moecache.trace import open_trace

    if "cpp" in engines and (extension() is None or not hasattr(extension(), "sim_replay")):
        raise SystemExit("victim_speed: the C++ core (moecache._C) is not built; build it or pass --engines python")
    full = open_trace(args.trace)
    seqs = {"python": args.seqs, "cpp": args.cpp_seqs}
    scheds = {}
    for e in engines:
        trace = full.select_sequences(full.sequences()[: seqs[e]])
        scheds[e] = Schedule(trace, decode_stream=True, name="deepseek-v2-lite")
    L, E, K = full.meta.num_layers, full.meta.num_experts, full.meta.top_k
    if "cpp" in engines:  # warm-up: the first C++ call loads torch and the extension
        warm = Schedule(full.select_sequences(full.sequences()[:1]), decode_stream=True, name="warm-up")
        for name in ("activation", "predicted"):
            pred = PREDICTORS.get("temporal")(L, E, K) if name == "predicted" else None
            simulate(warm, POLICIES.get(name)(resolve_capacity("25%", L, E, K, "global"), L, E, top_k=K,
                                              scope="global"), pred, depth=1 if pred else 0, bound=False, engine="cpp")
    # (engine, policy, scope, slots per pool, part of the slot sweep)
    configs = [(e, name, scope, resolve_capacity("25%", L, E, K, scope), False)
               for e in engines for name in ("activation", "predicted") for scope in ("layer", "global")]
    if "cpp" in engines:
        configs += [("cpp", "activation", scope, n, True) for scope, slots in (("layer", args.sweep_layer),
                                                                               ("global", args.sweep_global))
                    for n in slots]
    times: dict[tuple, dict[str, list[float]]] = {c: {"order": [], "scan": []} for c in configs}
    loads: list[float] = []
    result: dict[tuple, dict] = {}
    for rep in range(args.repeats):
        loads.append(_load())
        for config in configs:
            engine, name, scope, cap, _sweep = config
            rows = {}
            for variant in ("order", "scan"):
                cls = POLICIES.get(name)
                if engine == "python" and variant == "scan":
                    cls = scan_variant(cls)
                pol = cls(cap, L, E, top_k=K, scope=scope)
                pred = PREDICTORS.get("temporal")(L, E, K) if name == "predicted" else None
                with _variant(engine, variant):
                    t0 = time.perf_counter()
                    res = simulate(scheds[engine], pol, pred, depth=1 if pred else 0, bound=False, engine=engine)
                    times[config][variant].append(time.perf_counter() - t0)
                row = res.row()
                row.pop("policy", None)
                rows[variant] = row
                result[config] = {"accesses": res.accesses, "loads": res.loads, "prefetches": res.prefetches,
                                  "capacity": cap, "slots": cap * (L if scope == "layer" else 1)}
            if rows["order"] != rows["scan"]:
                raise SystemExit(f"{engine} {name} {scope} {cap} slots: the order structure and the scan disagree")
            print(f"repeat {rep + 1}: {engine} {name} {scope} {cap} slots",
                  {v: round(t[-1], 3) for v, t in times[config].items()}, file=sys.stderr)
    loads.append(_load())
    out_rows = []
    for config, t in times.items():
        engine, name, scope, cap, sweep = config
        info = result[config]
        acc = info["accesses"]
        r = {"engine": engine, "policy": name, "scope": scope, "sweep": sweep, "prompts": seqs[engine],
             "needs": scheds[engine].tokens * L, **info}
        for v in ("order", "scan"):
            med = statistics.median(t[v])
            r[v] = {"median_s": med, "min_s": min(t[v]), "max_s": max(t[v]), "runs_s": t[v],
                    "accesses_per_s": acc / med}
        r["speedup"] = r["scan"]["median_s"] / r["order"]["median_s"]
        out_rows.append(r)
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores, shared), "
                      f"Python {platform.python_version()}",
           "threads": "one: each replay runs in one thread (the C++ core single-threaded, OPENBLAS_NUM_THREADS=1)",
           "load_average_1min": loads,
           "command": "python eval/victim_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "trace": "DeepSeek-V2-Lite, decode stream, 25% of expert memory",
           "repeats": args.repeats, "rows": out_rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = args.out_dir / "victim_speed.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.out_dir / "victim_speed.json")
    md = render(out)
    tmp = args.out_dir / "victim_speed.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, args.out_dir / "victim_speed.md")
    print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
