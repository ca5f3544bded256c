"""How long ``moecache analyze`` takes on the 55,926-token DeepSeek-V2-Lite trace (600 CSV files).

Target (issue): under 60 s on 2 cores. Steps: import the CSVs once with the project's importer
(timed apart: not part of the analysis), then ``repeats`` times analyse the trace and write the
report folder exactly as the CLI does, with default options. Reported per stage: wall seconds and
CPU seconds of this process (CPU time is what a dedicated 2-core machine would see as wall time for
this single-threaded work; wall time also shows what other load did), plus the median over
repeats, the load average, machine and date. Writes ``eval/results/analyze_speed.json``.

    .venv/bin/python eval/analyze_speed.py [--repeats N] [--shared ../shared]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moecache.atomic import write_json_atomic  # noqa: E402


class Clock:
    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}
        self._last = None

    def mark(self, name: str | None) -> None:
        now = (time.perf_counter(), time.process_time())
        if self._last is not None:
            prev, (w, c) = self._last
            self.stages[prev] = {"wall_s": round(now[0] - w, 3), "cpu_s": round(now[1] - c, 3)}
        self._last = (name, now) if name else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(ROOT), "shared"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    src = os.path.join(args.shared, "data", "routing", "deepseek-v2-lite-chat__moe-beyond", "training_data_eamc")
    if not os.path.isdir(src):
        print(f"DeepSeek trace not found at {src}", file=sys.stderr)
        return 2
    from moecache.analysis.report import write_report
    from moecache.analysis.run import Options, analyze_trace
    from moecache.trace import open_trace
    from moecache.trace.importers import import_traces

    work = tempfile.mkdtemp(prefix="analyze-speed-")
    t0 = time.perf_counter()
    import_traces([src], os.path.join(work, "trace"))
    import_s = time.perf_counter() - t0
    runs = []
    for i in range(args.repeats):
        clock = Clock()
        w0, c0 = time.perf_counter(), time.process_time()
        clock.mark("open trace")
        trace = open_trace(os.path.join(work, "trace"))
        opts = Options()
        summary, data = analyze_trace(trace, opts, progress=clock.mark)
        clock.mark("plots and report")
        write_report(os.path.join(work, f"report{i}"), [(summary, data)], opts.to_json())
        clock.mark(None)
        runs.append({"wall_s": round(time.perf_counter() - w0, 3), "cpu_s": round(time.process_time() - c0, 3),
                     "stages": clock.stages, "load_avg_after": os.getloadavg()})
        print(f"run {i}: wall {runs[-1]['wall_s']:.1f} s, cpu {runs[-1]['cpu_s']:.1f} s", flush=True)
    t = summary
    result = {
        "what": "moecache analyze, default options, on the DeepSeek-V2-Lite-Chat moe-beyond trace",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
        "trace": {"tokens": t["tokens"], "sequences": t["sequences"], "layers": t["layers"],
                  "experts": t["experts"], "top_k": t["top_k"], "accesses": t["accesses"]},
        "options": Options().to_json(),
        "import_s": round(import_s, 3),
        "runs": runs,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "target_s": 60,
        "figures": {
            "layer_scope_25pct": next(r for r in t["cache"]["layer"]["rows"] if abs(r["share"] - 0.25) < 0.02),
            "global_scope_25pct": next(r for r in t["cache"]["global"]["rows"] if abs(r["share"] - 0.25) < 0.02),
            "popularity_mean": t["popularity"]["mean"],
            "reuse1_mean": t["temporal_locality"]["mean"][0],
        },
    }
    out = os.path.join(ROOT, "eval", "results", "analyze_speed.json")
    write_json_atomic(out, result)
    print(json.dumps({k: result[k] for k in ("median_wall_s", "median_cpu_s", "import_s")}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
