"""Benchmark: replay speed (expert accesses per second) of the C++ and Python simulator engines.

    python eval/sim_speed.py [--trace-dir DIR] [--python-seqs 40] [--repeat 3] [--jobs 2] [--out-dir eval/results]

Imports the whole DeepSeek-V2-Lite trace (600 prompts, 55,926 tokens x 26 MoE layers x top-6 =
8.7M expert accesses) once into a temporary folder, then runs these configurations, in layer scope
(16 of 64 slots per layer) and global scope (416 of 1,664 slots), both as a decode stream (every
token its own step: 8.7M needs) and with the batched prefill steps as recorded:

* LRU, the recency-frequency score (``lrfu``) and Belady, no predictor;
* with a trace-only predictor computed inside the C++ core and prefetch one MoE layer ahead:
  LRU with the cross-layer ``transition`` predictor, and the ``predicted`` policy (predictor-guided
  eviction) with the ``temporal`` predictor. Both predictors are fitted on the whole trace (this
  measures speed, not how well they generalise).

* C++ engine: the whole trace, one thread, after one warm-up call (it loads torch and the
  extension); median of ``--repeat`` runs of ``simulate(..., engine="cpp", bound=False)``, which
  includes packing the arrays in Python;
* Python reference (``MOECACHE_DISABLE_EXT=1``): the first ``--python-seqs`` prompts only (the whole
  trace would take minutes per run), one run; the C++ engine is also run on that prefix and its
  result row must equal the reference's (checked, recorded as ``identical``);
* a sweep of all configurations of one mode run one after another, in ``--jobs`` threads (the C++
  core releases the GIL) and in ``--jobs`` forked processes, ``--sweep-rounds`` times; the load
  average before each part is recorded, since other jobs on a shared machine take the second core,
  and the median speedup over the rounds is reported.

Goals (issue "C++ simulator core"): LRU >= 20M accesses/s on one core, Belady >= 5M/s, C++ >= 30x
the Python reference on every policy. Writes ``sim_speed.json`` and ``sim_speed.md`` (machine, date,
command) into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT.parent / "shared" / "data" / "routing" / "deepseek-v2-lite-chat__moe-beyond"
POLICIES = ("lru", "lrfu", "belady")
#: (policy, predictor, prefetch depth): the configurations with a trace-only predictor run in C++
WITH_PREDICTOR = (("lru", "transition", 1), ("predicted", "temporal", 1))
SCOPES = (("layer", "25%"), ("global", "25%"))
GOALS = {"lru_per_s": 20e6, "belady_per_s": 5e6, "speedup": 30.0}


def _machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_average_at_start": list(os.getloadavg()), "git_commit": commit}


def _run(sched, cfg, engine, predictors=None):
    """One replay of ``cfg`` = (policy, scope, slots, predictor name or None, depth); (row, seconds)."""
    from moecache.policies import new_policy
    from moecache.sim import simulate

    name, scope, slots, pname, depth = cfg
    m = sched.meta
    p = new_policy(name, slots, m.num_layers, m.num_experts, top_k=m.top_k, scope=scope)
    pred = copy.deepcopy(predictors[pname]) if pname else None  # fitted once; the reference mutates its copy
    t0 = time.perf_counter()
    r = simulate(sched, p, pred, depth=depth, bound=False, engine=engine)
    return r, time.perf_counter() - t0


def _label(cfg) -> str:
    name, _scope, _slots, pname, depth = cfg
    return name if pname is None else f"{name}+{pname} d{depth}"


_SWEEP: tuple = ()  # (schedule, predictors, configs) for the forked sweep workers


def _sweep_one(i: int) -> float:
    sched, predictors, configs = _SWEEP
    return _run(sched, configs[i], "cpp", predictors)[1]


def _sweep_round(sched, predictors, configs, jobs: int) -> dict:
    """All configurations one after another, in ``jobs`` threads and in ``jobs`` forked processes."""
    global _SWEEP
    out = {"load_before_one": os.getloadavg()[0]}
    t0 = time.perf_counter()
    for cfg in configs:
        _run(sched, cfg, "cpp", predictors)
    out["one_thread_s"] = time.perf_counter() - t0
    out["load_before_threads"] = os.getloadavg()[0]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda c: _run(sched, c, "cpp", predictors), configs))
    out["threads_s"] = time.perf_counter() - t0
    _SWEEP = (sched, predictors, configs)
    out["load_before_processes"] = os.getloadavg()[0]
    t0 = time.perf_counter()  # (includes forking the workers)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_sweep_one, range(len(configs))))
    out["processes_s"] = time.perf_counter() - t0
    _SWEEP = ()
    out["threads_speedup"] = out["one_thread_s"] / out["threads_s"]
    out["processes_speedup"] = out["one_thread_s"] / out["processes_s"]
    return out


def _sweep(sched, predictors, configs, jobs: int, rounds: int) -> dict:
    """``rounds`` rounds of the three ways (the machine is shared: a busy second core shows in one
    round's load average, not in all); the median speedups over the rounds."""
    done = [_sweep_round(sched, predictors, configs, jobs) for _ in range(rounds)]
    return {"runs": len(configs), "jobs": jobs, "rounds": done,
            "threads_speedup_median": statistics.median(r["threads_speedup"] for r in done),
            "processes_speedup_median": statistics.median(r["processes_speedup"] for r in done)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace-dir", default=str(DEFAULT_TRACE))
    ap.add_argument("--python-seqs", type=int, default=40, help="prompts the Python reference replays")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="threads / processes of the parallel sweep")
    ap.add_argument("--sweep-rounds", type=int, default=3, help="rounds of the sweep (median speedup reported)")
    ap.add_argument("--out-dir", default=str(ROOT / "eval" / "results"))
    args = ap.parse_args()

    from moecache._ext import ENV_DISABLE
    from moecache.atomic import write_json_atomic, write_text_atomic
    from moecache.predictors import PREDICTORS
    from moecache.sim import Schedule, resolve_capacity
    from moecache.trace import open_trace
    from moecache.trace.importers import import_traces

    started = datetime.now(timezone.utc)
    machine = _machine()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        import_traces([args.trace_dir], os.path.join(tmp, "trace"))
        trace = open_trace(os.path.join(tmp, "trace"))
        import_s = time.perf_counter() - t0
        m = trace.meta
        prefix = trace.select_sequences(trace.sequences()[:args.python_seqs])
        t0 = time.perf_counter()
        predictors = {}
        for pname in sorted({p for _n, p, _d in WITH_PREDICTOR}):
            predictors[pname] = PREDICTORS.get(pname)(m.num_layers, m.num_experts, m.top_k).fit(trace)
        fit_s = time.perf_counter() - t0
        rows = []
        sweeps = []
        for decode in (True, False):
            mode = "decode" if decode else "step"
            sched = Schedule(trace, decode_stream=decode, name="deepseek-v2-lite")
            psched = Schedule(prefix, decode_stream=decode, name="deepseek-v2-lite-prefix")
            _run(psched, ("lru", "layer", 16, None, 0), "cpp")  # warm-up: torch and the extension load here
            configs = []
            for scope, cap in SCOPES:
                slots = resolve_capacity(cap, m.num_layers, m.num_experts, m.top_k, scope)
                configs += [(name, scope, slots, None, 0) for name in POLICIES]
                configs += [(name, scope, slots, pname, depth) for name, pname, depth in WITH_PREDICTOR]
            configs.sort(key=lambda c: (c[3] is not None, POLICIES.index(c[0]) if c[3] is None else 0, c[1]))
            for cfg in configs:
                times = []
                for _ in range(args.repeat):
                    r, dt = _run(sched, cfg, "cpp", predictors)
                    times.append(dt)
                cpp_s = statistics.median(times)
                os.environ[ENV_DISABLE] = "1"
                try:
                    pr, py_s = _run(psched, cfg, "python", predictors)
                finally:
                    del os.environ[ENV_DISABLE]
                cr, _ = _run(psched, cfg, "cpp", predictors)
                name, scope, slots, pname, depth = cfg
                row = {"mode": mode, "policy": name, "predictor": pname, "depth": depth, "label": _label(cfg),
                       "scope": scope, "slots": slots, "accesses": r.accesses, "needs": r.needs,
                       "hit_rate": r.demand_hit_rate, "prefetches": r.prefetches, "cpp_s": cpp_s,
                       "cpp_runs_s": times, "cpp_per_s": r.accesses / cpp_s, "python_prefix_accesses": pr.accesses,
                       "python_s": py_s, "python_per_s": pr.accesses / py_s,
                       "identical_on_prefix": cr.row() == pr.row()}
                row["speedup"] = row["cpp_per_s"] / row["python_per_s"]
                rows.append(row)
                print(f"{mode:6s} {row['label']:26s} {scope:6s} cpp {row['cpp_per_s'] / 1e6:7.1f}M/s  "
                      f"python {row['python_per_s'] / 1e6:6.3f}M/s  x{row['speedup']:6.1f}  "
                      f"identical={row['identical_on_prefix']}", file=sys.stderr)
            # longest runs first (by their median above), so that two workers finish together
            took = {cfg: r["cpp_s"] for cfg, r in zip(configs, rows[-len(configs):])}
            sw = _sweep(sched, predictors, sorted(configs, key=lambda c: -took[c]), args.jobs, args.sweep_rounds)
            sw["mode"] = mode
            sweeps.append(sw)
            for r in sw["rounds"]:
                print(f"{mode} sweep of {len(configs)} runs: 1 thread {r['one_thread_s']:.2f} s, {args.jobs} threads "
                      f"{r['threads_s']:.2f} s, {args.jobs} processes {r['processes_s']:.2f} s", file=sys.stderr)

    lru = [r for r in rows if r["policy"] == "lru" and r["predictor"] is None]
    bel = [r for r in rows if r["policy"] == "belady" and r["predictor"] is None]
    goals = {
        "lru_20M_per_s": all(r["cpp_per_s"] >= GOALS["lru_per_s"] for r in lru),
        "belady_5M_per_s": all(r["cpp_per_s"] >= GOALS["belady_per_s"] for r in bel),
        "speedup_30x_decode": all(r["speedup"] >= GOALS["speedup"] for r in rows if r["mode"] == "decode"),
        "speedup_30x_step": all(r["speedup"] >= GOALS["speedup"] for r in rows if r["mode"] == "step"),
        "identical": all(r["identical_on_prefix"] for r in rows),
    }
    out = {"benchmark": "sim_speed", "date": started.isoformat(timespec="seconds"),
           "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT))
                                else sys.executable, *sys.argv]),
           "machine": machine, "trace": {"source": args.trace_dir, "tokens": len(trace.seq), "layers": m.num_layers,
                                         "experts": m.num_experts, "top_k": m.top_k, "import_s": import_s,
                                         "python_prefix_sequences": args.python_seqs,
                                         "python_prefix_tokens": len(prefix.seq), "predictor_fit_s": fit_s},
           "rows": rows, "sweeps": sweeps, "goals": goals}
    os.makedirs(args.out_dir, exist_ok=True)
    write_json_atomic(os.path.join(args.out_dir, "sim_speed.json"), out)
    write_text_atomic(os.path.join(args.out_dir, "sim_speed.md"), _markdown(out))
    print(_markdown(out))
    return 0


def _markdown(out: dict) -> str:
    mc, tr = out["machine"], out["trace"]
    lines = [
        "# Simulator replay speed: C++ engine vs Python reference", "",
        f"Date {out['date']}; machine: {mc['cpu']}, {mc['cores']} cores (shared with other jobs; load average "
        f"{', '.join(f'{x:.1f}' for x in mc['load_average_at_start'])} at start), {mc['platform']}, Python "
        f"{mc['python']}; commit {mc['git_commit'][:10]} plus the working tree.", "",
        f"Command: `{out['command']}`", "",
        f"Trace: DeepSeek-V2-Lite-Chat prefill routing ({tr['tokens']:,} tokens x {tr['layers']} MoE layers x "
        f"top-{tr['top_k']} of {tr['experts']}). The C++ engine replays the whole trace, one thread, median of "
        f"{len(out['rows'][0]['cpp_runs_s'])} runs after a warm-up; the Python reference (extension disabled) "
        f"replays the first {tr['python_prefix_sequences']} prompts ({tr['python_prefix_tokens']:,} tokens) once, "
        "so its rate is measured on a prefix. `identical`: the C++ row equals the reference row on that prefix. "
        "Capacity 25%: 16 slots per layer (layer scope) or 416 in all (global scope). Decode: every token its own "
        "step; step: the prefill batches as recorded (one step per prompt and layer). Rows with a predictor "
        "prefetch one MoE layer ahead (rule topk); `transition` and `temporal` run inside the C++ core and were "
        f"fitted on the whole trace ({tr['predictor_fit_s']:.1f} s); `predicted` evicts by the predictor's "
        "next-token probabilities.", "",
        "| mode | configuration | scope | accesses | needs | hit rate | prefetches | C++ M acc/s | Python M acc/s "
        "| speedup | identical |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in out["rows"]:
        lines.append(f"| {r['mode']} | {r['label']} | {r['scope']} | {r['accesses']:,} | {r['needs']:,} | "
                     f"{r['hit_rate']:.4f} | {r['prefetches']:,} | {r['cpp_per_s'] / 1e6:.1f} | "
                     f"{r['python_per_s'] / 1e6:.3f} | {r['speedup']:.1f}x | {r['identical_on_prefix']} |")
    lines += ["", "Sweeps: all configurations of a mode on the C++ engine, one after another, then in parallel "
              "threads (the core releases the GIL) and in forked processes; the 1-minute load average before "
              "each part says how busy the second core was with other jobs:", ""]
    for s in out["sweeps"]:
        lines.append(f"- {s['mode']} ({s['runs']} runs), median of {len(s['rounds'])} rounds: {s['jobs']} threads "
                     f"{s['threads_speedup_median']:.2f}x, {s['jobs']} processes {s['processes_speedup_median']:.2f}x "
                     "faster than one thread. Rounds:")
        for r in s["rounds"]:
            lines.append(f"  - one thread {r['one_thread_s']:.2f} s (load {r['load_before_one']:.1f}); {s['jobs']} "
                         f"threads {r['threads_s']:.2f} s, {r['threads_speedup']:.2f}x (load "
                         f"{r['load_before_threads']:.1f}); {s['jobs']} processes {r['processes_s']:.2f} s, "
                         f"{r['processes_speedup']:.2f}x (load {r['load_before_processes']:.1f})")
    g = out["goals"]
    lines += ["", "Goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in g.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
