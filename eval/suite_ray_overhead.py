"""The suite under a local Ray instance against ``--jobs 2`` on this machine: Ray's overhead.

    .venv/bin/python eval/suite_traces.py                       # the suite's traces, once
    .venv/bin/python eval/suite_ray_overhead.py [--repeats 3] [--traces NAME,...] [--out eval/results]

Each repeat runs the shipped suite (``eval/suite.toml``, or only the ``--traces`` named) twice into fresh
folders, once with ``--jobs 2`` (two worker processes) and once with ``--ray`` (a local instance the run
starts and stops itself, dashboard off, one CPU per task: two tasks at a time on this 2-core machine), in
alternating order, so that both modes see the same drift of a shared machine. Each run is a separate
``moecache bench`` process, timed wall-clock from start to exit (Ray's start-up and shutdown included).
Both modes must write byte-identical tables. The report gives each mode's median with its range and the
overhead of the medians, with the machine, date, load average and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"jobs2": ["--jobs", "2"], "ray": ["--ray"]}
COMPARED = ("results.md", "results.csv", "skipped.csv")


def subset_config(config: str, traces: list[str] | None, folder: str) -> str:
    """The config as JSON with absolute trace paths, keeping only ``traces`` (all when None)."""
    with open(config, "rb") as f:
        doc = tomllib.load(f)
    base = os.path.dirname(os.path.abspath(config))
    known = [t["name"] for t in doc["traces"]]
    if traces:
        unknown = sorted(set(traces) - set(known))
        if unknown:
            raise SystemExit(f"unknown trace(s) {', '.join(unknown)}; the config has {', '.join(known)}")
        doc["traces"] = [t for t in doc["traces"] if t["name"] in traces]
    for t in doc["traces"]:
        t["path"] = os.path.normpath(os.path.join(base, t["path"]))
        if not os.path.isdir(t["path"]):
            raise SystemExit(f"trace {t['name']!r} not built at {t['path']}: run eval/suite_traces.py first")
    doc["plots"] = False  # the same for both modes, and not what is measured
    path = os.path.join(folder, "suite.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def run_once(config: str, out: str, mode: str) -> float:
    cmd = [sys.executable, "-m", "moecache", "bench", "--suite", config, "-o", out, "--quiet", *MODES[mode]]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "eval", "suite.toml"))
    ap.add_argument("--traces", help="comma-separated trace names of the config (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "eval", "results"))
    args = ap.parse_args()
    traces = [t for t in args.traces.split(",") if t] if args.traces else None
    work = tempfile.mkdtemp(prefix="suite_ray_overhead_")
    try:
        config = subset_config(args.config, traces, work)
        seconds: dict[str, list[float]] = {m: [] for m in MODES}
        reference: dict[str, bytes] | None = None
        load = os.getloadavg()
        for rep in range(args.repeats):
            order = list(MODES) if rep % 2 == 0 else list(reversed(MODES))
            for mode in order:
                out = os.path.join(work, f"{mode}_{rep}")
                s = run_once(config, out, mode)
                seconds[mode].append(round(s, 2))
                got = {n: open(os.path.join(out, n), "rb").read() for n in COMPARED}
                if reference is None:
                    reference = got
                elif got != reference:
                    raise SystemExit(f"{mode} repeat {rep} wrote other tables than the first run")
                shutil.rmtree(out)
                print(f"repeat {rep + 1}/{args.repeats} {mode}: {s:.1f} s", flush=True)
        rows = sum(1 for _ in reference["results.csv"].splitlines()) - 1 if reference else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in seconds.items()}
    overhead = med["ray"] / med["jobs2"] - 1.0
    command = "python eval/suite_ray_overhead.py " + " ".join(sys.argv[1:])
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "command": command, "traces": traces or "all", "configurations": rows, "repeats": args.repeats,
        "load_average_at_start": [round(x, 2) for x in load],
        "seconds": seconds, "median": med, "overhead": round(overhead, 4), "goal": 0.15,
        "tables_identical": True,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "suite_ray_overhead.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [
        "# The suite on a local Ray instance against `--jobs 2`",
        "",
        f"{result['date']}, {platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()}; "
        f"`{command}`; traces: {', '.join(traces) if traces else 'all of eval/suite.toml'}; "
        f"{rows} configurations; plots off; two tasks at a time in both modes; "
        f"load average at start {load[0]:.1f}.",
        "",
        "| mode | median s | range s | runs |",
        "| --- | ---: | --- | --- |",
    ]
    for m in MODES:
        v = seconds[m]
        lines.append(f"| {m} | {med[m]:.1f} | {min(v):.1f}-{max(v):.1f} | {', '.join(f'{x:.1f}' for x in v)} |")
    lines += ["", f"Ray's overhead on the medians: {overhead:+.1%} (goal: under +15%: "
                  f"{'met' if overhead < 0.15 else 'not met'}). Both modes wrote byte-identical tables."]
    with open(os.path.join(args.out, "suite_ray_overhead.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
